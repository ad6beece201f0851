"""A public set of short user requests by department, with out-of-scope requests, built offline.

Source: Home Assistant's English intent sentences (PyPI `home-assistant-intents`, Apache-2.0),
parsed with their own parser (PyPI `hassil`). Each sentence template is expanded into concrete
requests by drawing one branch of every alternative and one value of every slot list with a seeded
generator (areas, device names and free-text items come from the short lists below: the package
leaves them to each home). The intents are grouped into departments by what they are about;
templates are split train / validation / test **by template**, so a test request is worded in a way
the training requests never were.

Out of scope: the intents no department here answers (weather, time and date, broadcasts, small
talk), the user questions of Django's FAQ (`temporal_lora.corpora.django_faq`: real questions,
another world entirely) and the bench's hand-written domain questions (benchmarks/data/questions.jsonl:
medicine, licences, programming, literature).

    load_requests(seed=0) -> RequestSet(domains={dept: {"train", "val", "test"}}, oos={...}, source)
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

from hassil.expression import (
    Alternative,
    Group,
    ListReference,
    Permutation,
    RuleReference,
    TextChunk,
)
from hassil.intents import Intents, RangeSlotList, TextSlotList
from home_assistant_intents import get_intents

from temporal_lora.cache import atomic_write_text, cache_dir
from temporal_lora.corpora.django_faq import load_records

VERSION = 1
PER_TEMPLATE = 40  # distinct requests drawn per template, at most
CAPS = {"train": 1500, "val": 150, "test": 450}  # requests per department and split, at most
OOS_SPLIT = {"train": 0.2, "val": 0.2}  # the rest is test

# Intent (and, for the generic on/off/state intents, the device domain) -> department.
DEPARTMENTS = {
    "lights": {"HassLightSet": None, "HassTurnOn": "light", "HassTurnOff": "light", "HassGetState": "light"},
    "climate": {"HassClimateGetTemperature": None, "HassClimateSetTemperature": None,
                "HassClimateSetFanMode": None, "HassFanSetSpeed": None, "HassTurnOn:fan": "fan",
                "HassTurnOff:fan": "fan", "HassGetState:fan": "fan"},
    "media": {"HassMediaNext": None, "HassMediaPause": None, "HassMediaUnpause": None, "HassMediaPrevious": None,
              "HassMediaPlayerMute": None, "HassMediaPlayerUnmute": None, "HassMediaSearchAndPlay": None,
              "HassSetVolume": None, "HassSetVolumeRelative": None},
    "timers": {"HassStartTimer": None, "HassCancelTimer": None, "HassCancelAllTimers": None,
               "HassDecreaseTimer": None, "HassIncreaseTimer": None, "HassPauseTimer": None,
               "HassUnpauseTimer": None, "HassTimerStatus": None},
    "lists": {"HassShoppingListAddItem": None, "HassShoppingListCompleteItem": None, "HassListAddItem": None,
              "HassListCompleteItem": None, "HassListRemoveItem": None},
    "doors": {"HassSetPosition": None, "HassTurnOn:cover": "cover", "HassTurnOff:cover": "cover",
              "HassGetState:cover": "cover", "HassGetState:lock": "lock"},
    "cleaning": {"HassVacuumStart": None, "HassVacuumReturnToBase": None, "HassVacuumCleanArea": None,
                 "HassLawnMowerDock": None, "HassLawnMowerStartMowing": None},
}
OUT_OF_SCOPE_INTENTS = ("HassGetWeather", "HassGetCurrentTime", "HassGetCurrentDate", "HassBroadcast",
                        "HassNevermind", "HassRespond")

# Values the package leaves to each home (areas, device names) and free-text slots.
AREAS = ["kitchen", "living room", "bedroom", "bathroom", "office", "garage", "hallway", "dining room",
         "kids room", "basement", "attic", "porch"]
FLOORS = ["upstairs", "downstairs", "first floor", "ground floor"]
NAMES = {
    "lights": ["ceiling light", "desk lamp", "porch light", "floor lamp", "kitchen lights", "night light"],
    "climate": ["thermostat", "ceiling fan", "bedroom fan", "heater", "air conditioner"],
    "media": ["TV", "living room speaker", "kitchen radio", "soundbar", "bedroom speaker"],
    "doors": ["garage door", "front door", "blinds", "living room curtains", "back door", "skylight"],
    "cleaning": ["robot vacuum", "Roomba", "lawn mower", "mower"],
    None: ["coffee maker", "fountain", "christmas tree"],
}
WILDCARDS = {
    "shopping_list_item": ["milk", "eggs", "batteries", "dog food", "paper towels", "olive oil", "apples"],
    "todo_list_item": ["call the plumber", "pay rent", "water the plants", "book a dentist appointment"],
    "search_query": ["jazz", "the Beatles", "Abbey Road", "some relaxing music", "Taylor Swift", "podcasts"],
    "timer_name": ["pasta", "laundry", "tea", "pizza", "nap"],
    "timer_command": ["turn off the oven", "open the blinds"],
    "message": ["dinner is ready", "time for bed", "we are leaving in five minutes"],
    "zone": ["Paris", "London", "Tokyo", "New York"],
}


@dataclass
class RequestSet:
    domains: dict[str, dict[str, list[str]]]
    oos: dict[str, list[str]]
    source: dict


def load_requests(seed: int = 0) -> RequestSet:
    """The request set (built once per seed and cached as JSON)."""
    path = cache_dir() / "requests" / f"home-assistant-intents.v{VERSION}.seed{seed}.json"
    if path.is_file():
        return RequestSet(**json.loads(path.read_text(encoding="utf-8")))
    built = build(seed)
    atomic_write_text(path, json.dumps(asdict(built), ensure_ascii=False))
    return built


def build(seed: int) -> RequestSet:
    intents = Intents.from_dict(get_intents("en"))
    templates = templates_by_group(intents)
    rng = random.Random(seed)
    domains = {}
    for dept in DEPARTMENTS:
        by_split = split_templates(templates.get(dept, []), seed)
        domains[dept] = {s: cap(expand_all(intents, ts, dept, rng), CAPS[s], rng) for s, ts in by_split.items()}
    oos_texts = expand_all(intents, templates.get("oos", []), None, rng) + faq_questions() + domain_questions()
    oos_texts = sorted(set(oos_texts))
    rng.shuffle(oos_texts)
    n_train, n_val = (round(f * len(oos_texts)) for f in OOS_SPLIT.values())
    oos = {"train": oos_texts[:n_train], "val": oos_texts[n_train:n_train + n_val],
           "test": oos_texts[n_train + n_val:]}
    source = {
        "packages": {p: version(p) for p in ("home-assistant-intents", "hassil")},
        "licence": "home-assistant-intents: Apache-2.0 (its sentences); Django FAQ: BSD-3-Clause; "
                   "questions.jsonl: this project's",
        "departments": {d: sorted(DEPARTMENTS[d]) for d in DEPARTMENTS},
        "out_of_scope": {"intents": list(OUT_OF_SCOPE_INTENTS),
                         "other": "Django FAQ user questions; benchmarks/data/questions.jsonl"},
        "split": "by template (70/10/20 per department); out-of-scope by request (20/20/60)",
        "summary": {**{d: {s: len(v) for s, v in sp.items()} for d, sp in domains.items()},
                    "out_of_scope": {s: len(v) for s, v in oos.items()}},
        "seed": seed,
    }
    return RequestSet(domains, oos, source)


def group_of(intent: str, device_domain: str | None) -> str | None:
    """The department of one intent's sentence group ('oos' for out-of-scope intents, None: left out)."""
    if intent in OUT_OF_SCOPE_INTENTS:
        return "oos"
    for dept, members in DEPARTMENTS.items():
        for key, domain in members.items():
            name = key.split(":")[0]
            if name == intent and (domain is None or domain == device_domain):
                return dept
    return None  # e.g. "turn on the {name}" with no device domain: any department's


def templates_by_group(intents) -> dict[str, list]:
    out: dict[str, list] = {}
    for name, intent in intents.intents.items():
        for data in intent.data:
            group = group_of(name, (data.slots or {}).get("domain"))
            if group is not None:
                out.setdefault(group, []).extend(data.sentences)
    return out


def split_templates(sentences: list, seed: int) -> dict[str, list]:
    """Templates to train / val / test (70 / 10 / 20, at least one each), by a seeded hash of their text."""
    order = sorted(sentences, key=lambda s: hashlib.sha256(f"{seed}:{s.text}".encode()).hexdigest())
    n = len(order)
    n_test, n_val = max(1, round(0.2 * n)), max(1, round(0.1 * n))
    return {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}


def expand_all(intents, sentences: list, dept: str | None, rng: random.Random) -> list[str]:
    out: list[str] = []
    for sentence in sentences:
        seen: set[str] = set()
        for _ in range(PER_TEMPLATE * 3):  # draws; repeated requests are dropped
            text = " ".join(expand(sentence.expression, intents, dept, rng).split())
            if text and text.lower() not in seen:
                seen.add(text.lower())
                out.append(text)
            if len(seen) >= PER_TEMPLATE:
                break
    return out


def expand(expr, intents, dept: str | None, rng: random.Random) -> str:
    """One random request of a hassil expression: one branch of each alternative, one value per list."""
    if isinstance(expr, TextChunk):
        return expr.text
    if isinstance(expr, Alternative):
        return expand(rng.choice(expr.items), intents, dept, rng)
    if isinstance(expr, Permutation):
        items = list(expr.items)
        rng.shuffle(items)
        return " ".join(expand(i, intents, dept, rng) for i in items)
    if isinstance(expr, Group):
        return "".join(expand(i, intents, dept, rng) for i in expr.items)
    if isinstance(expr, RuleReference):
        return expand(intents.expansion_rules[expr.rule_name].expression, intents, dept, rng)
    if isinstance(expr, ListReference):
        return list_value(expr, intents, dept, rng)
    raise TypeError(f"unknown hassil expression {type(expr).__name__}")


def list_value(ref, intents, dept: str | None, rng: random.Random) -> str:
    name = ref.list_name
    if name == "area":
        return rng.choice(AREAS)
    if name == "floor":
        return rng.choice(FLOORS)
    if name == "name":
        return rng.choice(NAMES.get(dept, NAMES[None]))
    if name in WILDCARDS:
        return rng.choice(WILDCARDS[name])
    slot = intents.slot_lists.get(name)
    if isinstance(slot, RangeSlotList):
        return str(rng.randrange(slot.start, slot.stop + 1, slot.step))
    if isinstance(slot, TextSlotList):
        return expand(rng.choice(slot.values).text_in, intents, dept, rng)
    if ref.is_inline_range:
        start, stop, step = ref.get_inline_range()
        return str(rng.randrange(start, stop + 1, step))
    raise KeyError(f"no values for the slot list {name!r}")


def cap(texts: list[str], n: int, rng: random.Random) -> list[str]:
    texts = sorted(set(texts))
    rng.shuffle(texts)
    return texts[:n]


def faq_questions() -> list[str]:
    """The user turns of Django's FAQ conversations (one question each)."""
    return [m["content"] for r in load_records() for m in r["messages"] if m["role"] == "user"]


def domain_questions() -> list[str]:
    """The bench's hand-written questions about the built-in domains (none is a home request)."""
    path = Path(__file__).resolve().parent / "data" / "questions.jsonl"
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
