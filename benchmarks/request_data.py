"""Short user requests by department, with out-of-scope requests, from public packages (issue 25).

In scope: Home Assistant's English intent sentence templates (PyPI `home-assistant-intents`,
`home_assistant_intents/data/en.json`, read straight from the wheel), parsed with their own parser
(PyPI `hassil`) and expanded into concrete requests by a seeded random walk: one branch of every
alternative, one value of every slot list (the package's own lists; areas, device names and the
free-text wildcard slots, which the package leaves to each home, from the short lists below).
Intents are grouped into departments by what they are about; the generic HassTurnOn / HassTurnOff /
HassGetState blocks by the device domain they name (`slots.domain` or `requires_context.domain`), so
"turn on the lights" is a lights request and "open the garage door" a covers one.

Out of scope, two sources:
- whole HA groups no department answers (weather, time and date, people's whereabouts, talk to the
  assistant itself), held out of the departments;
- the opening user turns of the ChatterBot dialog corpus (PyPI `chatterbot-corpus`, English):
  real short questions and remarks about everything else (trivia, science, movies, computers...).

Templates are split train / val / test **by template** (a template's expansions stay in one split),
so a test request is worded in a way no training request was; ChatterBot questions are split one by
one. Every text is lower-cased with trailing punctuation dropped (the style of HA's templates: a
voice transcript), so casing and a final "?" do not give the source away. Texts are deduplicated
exactly (case/space-insensitive): a text two labels share is dropped, and no split shares a text.

    load_requests(seed=0) -> RequestSet(domains={dept: {"train", "val", "test"}}, oos={...}, source)
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from email.parser import Parser
from importlib.metadata import PackageNotFoundError, metadata
from pathlib import Path

import yaml

from temporal_lora.cache import atomic_write_text, cache_dir, fetch_package
from temporal_lora.errors import CorpusError

try:  # hassil parses the templates; it is needed only to build the set (the bench extra)
    from hassil.expression import (
        Alternative,
        Group,
        ListReference,
        Permutation,
        RuleReference,
        TextChunk,
    )
    from hassil.intents import Intents, RangeSlotList, TextSlotList, WildcardSlotList
    from hassil.parse_expression import parse_sentence
except ImportError as exc:  # pragma: no cover - depends on the environment
    _HASSIL_MISSING: ImportError | None = exc
else:
    _HASSIL_MISSING = None

HA_REQUIREMENT = "home-assistant-intents==2026.12.1"
HA_MEMBER = "home_assistant_intents/data/en.json"
CHAT_REQUIREMENT = "chatterbot-corpus==1.3.3"
CHAT_FOLDER = "chatterbot_corpus/data/english/"
VERSION = 1

SPLITS = ("train", "val", "test")
CAPS = {"train": 1500, "val": 150, "test": 450}  # requests per department and split, at most
OOS_CAPS = {"train": 100, "val": 100, "test": 1000}
TEMPLATE_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}  # of a department's templates
OOS_TEMPLATE_FRACTIONS = {"train": 0.25, "val": 0.25, "test": 0.5}  # of an out-of-scope group's templates
CHAT_FRACTIONS = {"train": 0.1, "val": 0.1, "test": 0.8}  # of the ChatterBot questions
PER_TEMPLATE = 60  # distinct requests drawn from one template, at most
DRAWS_PER_TEMPLATE = 4 * PER_TEMPLATE  # random walks tried per template (repeats are dropped)
MAX_WORDS = 25  # a request longer than this is not short

DEPARTMENTS = ("lights", "climate", "media", "timers", "lists", "covers", "locks", "cleaning", "scenes")
OOS_GROUPS = ("weather", "time", "presence", "assistant")  # held out: no department answers them
OOS = "oos"

# Intents whose subject is the intent itself -> (group, the device domain their {name} refers to).
INTENT_GROUPS: dict[str, tuple[str, str | None]] = {
    "HassLightSet": ("lights", "light"),
    "HassClimateGetTemperature": ("climate", "climate"),
    "HassClimateSetTemperature": ("climate", "climate"),
    "HassClimateSetFanMode": ("climate", "climate"),
    "HassFanSetSpeed": ("climate", "fan"),
    **{i: ("media", "media_player") for i in (
        "HassMediaNext", "HassMediaPrevious", "HassMediaPause", "HassMediaUnpause", "HassMediaPlayerMute",
        "HassMediaPlayerUnmute", "HassMediaSearchAndPlay", "HassSetVolume", "HassSetVolumeRelative")},
    **{i: ("timers", None) for i in (
        "HassStartTimer", "HassCancelTimer", "HassCancelAllTimers", "HassIncreaseTimer", "HassDecreaseTimer",
        "HassPauseTimer", "HassUnpauseTimer", "HassTimerStatus")},
    **{i: ("lists", "todo") for i in (
        "HassShoppingListAddItem", "HassShoppingListCompleteItem", "HassListAddItem", "HassListCompleteItem",
        "HassListRemoveItem")},
    "HassSetPosition": ("covers", "cover"),
    "HassVacuumStart": ("cleaning", "vacuum"),
    "HassVacuumReturnToBase": ("cleaning", "vacuum"),
    "HassVacuumCleanArea": ("cleaning", "vacuum"),
    "HassLawnMowerStartMowing": ("cleaning", "lawn_mower"),
    "HassLawnMowerDock": ("cleaning", "lawn_mower"),
    "HassGetWeather": ("weather", "weather"),
    "HassGetCurrentTime": ("time", None),
    "HassGetCurrentDate": ("time", None),
    "HassNevermind": ("assistant", None),
    "HassRespond": ("assistant", None),
    "HassBroadcast": ("assistant", None),
}
# On/off/state intents are about whatever device they name: the device domain picks the group.
GENERIC_INTENTS = ("HassTurnOn", "HassTurnOff", "HassGetState")
DEVICE_GROUPS = {
    "light": "lights", "fan": "climate", "climate": "climate", "media_player": "media",
    "cover": "covers", "valve": "covers", "lock": "locks", "vacuum": "cleaning", "lawn_mower": "cleaning",
    "scene": "scenes", "script": "scenes", "button": "scenes", "input_button": "scenes",
    "person": "presence",
    # switch, input_boolean, sensor, binary_sensor: left out ("is the front door open" is a door
    # sensor and a cover alike; "turn on the coffee maker" could be any department's).
}

# What each home names itself (the package ships no values for these lists).
AREAS = ["kitchen", "living room", "bedroom", "bathroom", "office", "garage", "hallway", "dining room",
         "kids room", "basement", "attic", "guest room"]
FLOORS = ["upstairs", "downstairs", "first", "ground", "second", "top"]
NAMES = {
    "light": ["ceiling light", "desk lamp", "porch light", "floor lamp", "reading lamp", "night light",
              "chandelier", "pendant"],
    "fan": ["ceiling fan", "desk fan", "tower fan", "bedroom fan"],
    "climate": ["thermostat", "heat pump", "air conditioner", "heater"],
    "media_player": ["tv", "living room speaker", "kitchen radio", "soundbar", "bedroom speaker", "sonos"],
    "cover": ["garage door", "blinds", "living room curtains", "skylight", "awning", "roller shutter"],
    "valve": ["water valve", "sprinkler valve", "main water valve", "gas valve"],
    "lock": ["front door", "back door", "side gate", "patio door", "garage door lock"],
    "vacuum": ["robot vacuum", "roomba", "vacuum"],
    # Templates say "{name} [mower]": a name with "mower" in it would read "mower mower".
    "lawn_mower": ["automower", "husqvarna", "robomow", "backyard"],
    "scene": ["movie night", "romantic", "good morning", "dinner", "reading", "party", "relax"],
    "script": ["bedtime", "morning routine", "goodnight", "leaving home"],
    "button": ["doorbell", "restart router", "garage opener"],
    "input_button": ["doorbell", "restart router", "garage opener"],
    "todo": ["chores", "to-do", "groceries", "work", "packing"],
    "weather": ["home", "paris", "london", "new york", "cabin"],
    "person": ["paul", "anna", "mom", "dad", "sarah"],
    None: ["tv", "speaker", "thermostat", "lamp"],
}
WILDCARDS = {
    "shopping_list_item": ["milk", "eggs", "batteries", "dog food", "paper towels", "olive oil", "apples",
                           "coffee", "bread"],
    "todo_list_item": ["call the plumber", "pay rent", "water the plants", "book a dentist appointment",
                       "renew passport", "clean the gutters"],
    "search_query": ["jazz", "the beatles", "abbey road", "some relaxing music", "taylor swift", "podcasts",
                     "the news", "lo-fi beats"],
    "timer_name": ["pasta", "laundry", "tea", "pizza", "nap", "eggs"],
    "timer_command": ["turn off the oven", "open the blinds", "turn off the lights"],
    "message": ["dinner is ready", "time for bed", "we are leaving in five minutes"],
    "zone": ["home", "work", "school", "the gym", "the office"],
}
RANGES = {"temperature": (16, 28)}  # the package's 0-100 degrees; a thermostat request asks this
_TRAILING = re.compile(r"[\s.?!,;:]+$")


@dataclass
class RequestSet:
    """texts by department and split, out-of-scope texts by split, and where they come from."""

    domains: dict[str, dict[str, list[str]]]
    oos: dict[str, list[str]]
    source: dict


@dataclass(frozen=True)
class Template:
    """One sentence template of en.json, with the group its data block belongs to."""

    intent: str
    group: str
    domains: tuple[str, ...]  # the device domains its {name} may refer to
    text: str


def load_requests(seed: int = 0) -> RequestSet:
    """The request set for `seed`: built once, then read from the cache (JSON)."""
    path = cache_dir() / "requests" / f"ha-departments.v{VERSION}.seed{seed}.json"
    if path.is_file():
        return RequestSet(**json.loads(path.read_text(encoding="utf-8")))
    built = build_requests(seed)
    atomic_write_text(path, json.dumps(asdict(built), ensure_ascii=False))
    return built


def build_requests(seed: int = 0) -> RequestSet:
    """Fetch the two packages, expand, split, deduplicate and cap (deterministic given `seed`)."""
    if _HASSIL_MISSING is not None:
        raise CorpusError(f"building the request set needs hassil (pip install 'temporal-lora[bench]'): "
                          f"{_HASSIL_MISSING}")
    ha_wheel, chat_wheel = fetch_package(HA_REQUIREMENT), fetch_package(CHAT_REQUIREMENT)
    raw = read_en_json(ha_wheel)
    intents = Intents.from_dict(raw)
    templates, left_out = group_templates(raw)
    units: dict[str, dict[str, list[list[str]]]] = {}  # label -> split -> one list per template
    for group, members in sorted(templates.items()):
        held_out = group in OOS_GROUPS
        fractions = OOS_TEMPLATE_FRACTIONS if held_out else TEMPLATE_FRACTIONS
        by_split = units.setdefault(OOS if held_out else group, {s: [] for s in SPLITS})
        for split, part in split_by_hash(members, lambda t: t.text, fractions, seed).items():
            by_split[split] += [expand_template(t, intents, seed) for t in part]
    questions = chat_questions(chat_wheel)
    for split, members in split_by_hash(questions, lambda q: q, CHAT_FRACTIONS, seed).items():
        units[OOS][split] += [[q] for q in members]
    units, ambiguous = deduplicate(units)
    rng = random.Random(seed)
    domains = {d: {s: round_robin(units.get(d, {}).get(s, []), CAPS[s], rng) for s in SPLITS}
               for d in DEPARTMENTS}
    oos = {s: round_robin(units[OOS][s], OOS_CAPS[s], rng) for s in SPLITS}
    empty = [f"{d}/{s}" for d, sp in domains.items() for s, texts in sp.items() if not texts]
    empty += [f"out-of-scope/{s}" for s, texts in oos.items() if not texts]
    if empty:  # a department without validation requests cannot take part in threshold choice
        raise CorpusError(f"the request set has empty splits: {', '.join(empty)}")
    source = describe(templates, left_out, domains, oos, ambiguous, questions, seed,
                      [(HA_REQUIREMENT, ha_wheel), (CHAT_REQUIREMENT, chat_wheel)])
    return RequestSet(domains, oos, source)


# ------------------------------------------------------------------------------ grouping
def group_of(intent: str, block: dict) -> tuple[str | None, tuple[str, ...]]:
    """(group, device domains) of one data block of en.json; group None: left out (its requests
    could be several departments', or belong to none we model as such)."""
    domains = block_domains(block)
    if intent in INTENT_GROUPS:
        group, default = INTENT_GROUPS[intent]
        return group, domains or ((default,) if default else ())
    if intent in GENERIC_INTENTS:
        groups = {DEVICE_GROUPS.get(d) for d in domains}
        if len(groups) == 1 and None not in groups:
            return groups.pop(), domains
    return None, domains


def block_domains(block: dict) -> tuple[str, ...]:
    """The device domains a block names: `slots.domain` (a string) and `requires_context.domain`
    (a string or a list), sorted."""
    found: set[str] = set()
    for part in ("slots", "requires_context"):
        value = (block.get(part) or {}).get("domain")
        if isinstance(value, str):
            found.add(value)
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return tuple(sorted(found))


def group_templates(raw: dict) -> tuple[dict[str, list[Template]], dict[str, int]]:
    """Every template of an en.json-like dict by group, and the templates left out per intent."""
    groups: dict[str, list[Template]] = {}
    left_out: dict[str, int] = {}
    for intent, spec in sorted(raw.get("intents", {}).items()):
        for block in spec.get("data", []):
            group, domains = group_of(intent, block)
            sentences = block.get("sentences", [])
            if group is None:
                left_out[intent] = left_out.get(intent, 0) + len(sentences)
                continue
            groups.setdefault(group, []).extend(Template(intent, group, domains, s) for s in sentences)
    return groups, left_out


# ------------------------------------------------------------------------------ splitting and capping
def split_by_hash(items: list, key, fractions: dict[str, float], seed: int) -> dict[str, list]:
    """Items to train / val / test by a seeded hash of `key(item)` (stable when items are added
    elsewhere). Test gets at least one item, val one when there are two or more, train the rest."""
    order = sorted(items, key=lambda i: hashlib.sha256(f"{seed}:{key(i)}".encode()).hexdigest())
    n = len(order)
    n_test = min(n, max(1, round(fractions["test"] * n))) if n else 0
    n_val = min(n - n_test, max(1, round(fractions["val"] * n))) if n >= 2 else 0
    return {"train": order[n_test + n_val:], "val": order[n_test:n_test + n_val], "test": order[:n_test]}


def normalise(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation: the style of HA's templates."""
    return _TRAILING.sub("", " ".join(text.lower().split()))


def deduplicate(units: dict[str, dict[str, list[list[str]]]]) -> tuple[dict, int]:
    """Exact deduplication (texts are already normalised): a text under two labels is dropped
    everywhere (its label is ambiguous); within a label a text is kept in one split only (test,
    else val, else train: the held-out splits stay as drawn) and once per split."""
    labels_of: dict[str, set[str]] = {}
    for label, by_split in units.items():
        for unit_list in by_split.values():
            for unit in unit_list:
                for text in unit:
                    labels_of.setdefault(text, set()).add(label)
    ambiguous = {t for t, labels in labels_of.items() if len(labels) > 1}
    out: dict[str, dict[str, list[list[str]]]] = {}
    for label, by_split in units.items():
        seen = set(ambiguous)
        out[label] = {}
        for split in ("test", "val", "train"):
            kept = []
            for unit in by_split.get(split, []):
                fresh = [t for t in unit if t not in seen]
                seen.update(fresh)
                if fresh:
                    kept.append(fresh)
            out[label][split] = kept
    return out, len(ambiguous)


def round_robin(units: list[list[str]], cap: int, rng: random.Random) -> list[str]:
    """At most `cap` texts, one per unit (template) in turn, so that every template is represented
    before any gives a second text; units and their texts in a seeded order. Returned shuffled."""
    queues = [rng.sample(u, len(u)) for u in rng.sample(units, len(units))]
    out: list[str] = []
    depth = 0
    while len(out) < cap and any(depth < len(q) for q in queues):
        out += [q[depth] for q in queues if depth < len(q)][: cap - len(out)]
        depth += 1
    rng.shuffle(out)
    return out


# ------------------------------------------------------------------------------ expansion
def expand_template(template: Template, intents, seed: int, n: int = PER_TEMPLATE) -> list[str]:
    """Up to `n` distinct normalised requests of one template (random walks seeded by the seed and
    the template, so one template's requests do not depend on which others are expanded)."""
    rng = random.Random(f"{seed}:{template.group}:{template.intent}:{template.text}")
    expression = parse_sentence(template.text, keep_text=True).expression
    seen: dict[str, None] = {}
    for _ in range(DRAWS_PER_TEMPLATE):
        text = normalise(walk(expression, intents, template.domains, rng))
        if text and len(text.split()) <= MAX_WORDS:
            seen.setdefault(text, None)
        if len(seen) >= n:
            break
    return list(seen)


def walk(expr, intents, domains: tuple[str, ...], rng: random.Random) -> str:
    """One random request of a hassil expression: one branch of each alternative, one value per list."""
    if isinstance(expr, TextChunk):
        return expr.text
    if isinstance(expr, Alternative):
        return walk(rng.choice(expr.items), intents, domains, rng)
    if isinstance(expr, Permutation):
        items = rng.sample(expr.items, len(expr.items))
        return " ".join(walk(i, intents, domains, rng) for i in items)
    if isinstance(expr, Group):
        return "".join(walk(i, intents, domains, rng) for i in expr.items)
    if isinstance(expr, RuleReference):
        return walk(intents.expansion_rules[expr.rule_name].expression, intents, domains, rng)
    if isinstance(expr, ListReference):
        return slot_value(expr, intents, domains, rng)
    raise CorpusError(f"unknown hassil expression {type(expr).__name__}")


def slot_value(ref, intents, domains: tuple[str, ...], rng: random.Random) -> str:
    """A value of one slot list: the package's own list where it has values, else the home's."""
    name = ref.list_name
    if name == "area":
        return rng.choice(AREAS)
    if name == "floor":
        return rng.choice(FLOORS)
    if name == "name":
        pool = sorted({v for d in domains for v in NAMES.get(d, [])}) or NAMES[None]
        return rng.choice(pool)
    slot = intents.slot_lists.get(name)
    if isinstance(slot, TextSlotList):
        return walk(rng.choice(slot.values).text_in, intents, domains, rng)
    if isinstance(slot, RangeSlotList):
        low, high = RANGES.get(name, (slot.start, slot.stop))
        return str(rng.randrange(low, high + 1, slot.step))
    if name in WILDCARDS and (slot is None or isinstance(slot, WildcardSlotList)):
        return rng.choice(WILDCARDS[name])
    if ref.is_inline_range:
        start, stop, step = ref.get_inline_range()
        return str(rng.randrange(start, stop + 1, step))
    raise CorpusError(f"no values for the slot list {name!r}")


# ------------------------------------------------------------------------------ the packages
def read_en_json(wheel: Path) -> dict:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return json.loads(zf.read(HA_MEMBER))
    except (KeyError, zipfile.BadZipFile, ValueError) as exc:
        raise CorpusError(f"{wheel.name} has no readable {HA_MEMBER}: {exc}") from exc


def chat_questions(wheel: Path) -> list[str]:
    """The opening user turn of every English ChatterBot conversation, normalised, unique, short."""
    out: dict[str, None] = {}
    try:
        with zipfile.ZipFile(wheel) as zf:
            for member in sorted(n for n in zf.namelist() if n.startswith(CHAT_FOLDER) and n.endswith(".yml")):
                doc = yaml.safe_load(zf.read(member)) or {}
                for text in _openers(doc.get("conversations") or []):
                    text = normalise(text)
                    if text and len(text.split()) <= MAX_WORDS:
                        out.setdefault(text, None)
    except (zipfile.BadZipFile, yaml.YAMLError) as exc:
        raise CorpusError(f"{wheel.name}: cannot read the ChatterBot corpus: {exc}") from exc
    if not out:
        raise CorpusError(f"{wheel.name} has no English conversations under {CHAT_FOLDER}")
    return list(out)


def _openers(conversations: Iterable) -> Iterable[str]:
    for conversation in conversations:
        if isinstance(conversation, list) and conversation and isinstance(conversation[0], str):
            yield conversation[0]


def wheel_info(requirement: str, wheel: Path) -> dict:
    """Name, version and licence of a wheel, from its METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(name).decode("utf-8"))
    return {"requirement": requirement, "version": meta["Version"], "licence": _licence(meta)}


def _licence(meta) -> str:
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License")]
    return meta.get("License-Expression") or meta.get("License") or ", ".join(classifiers) or "unknown"


def describe(templates: dict[str, list[Template]], left_out: dict[str, int], domains: dict, oos: dict,
             ambiguous: int, questions: list[str], seed: int, wheels: list[tuple[str, Path]]) -> dict:
    """The `source` record: packages, grouping, counts."""
    chat = set(questions)
    packages = {req.partition("==")[0]: wheel_info(req, path) for req, path in wheels}
    try:
        hassil_meta = metadata("hassil")
        packages["hassil"] = {"version": hassil_meta["Version"], "licence": _licence(hassil_meta),
                              "role": "parses and expands the templates"}
    except PackageNotFoundError:  # pragma: no cover - build_requests checked the import
        pass
    def member(t: Template) -> str:  # the generic intents are split by device domain
        return f"{t.intent}[{','.join(t.domains)}]" if t.intent in GENERIC_INTENTS else t.intent

    grouping = {g: sorted({member(t) for t in ts}) for g, ts in sorted(templates.items())}
    return {
        "packages": packages,
        "departments": list(DEPARTMENTS),
        "grouping": grouping,
        "out_of_scope_groups": list(OOS_GROUPS),
        "out_of_scope_other": f"{CHAT_REQUIREMENT}: opening user turns of the English conversations "
                              f"({len(questions)} unique)",
        "left_out_templates": left_out,
        "templates": {g: len(ts) for g, ts in sorted(templates.items())},
        "split": "departments by template (70/10/20); out-of-scope HA groups by template (25/25/50); "
                 "ChatterBot questions one by one (10/10/80); then capped per split",
        "caps": {"department": CAPS, "out_of_scope": OOS_CAPS, "per_template": PER_TEMPLATE},
        "ambiguous_texts_dropped": ambiguous,
        "counts": {**{d: {s: len(v) for s, v in sp.items()} for d, sp in domains.items()},
                   "out_of_scope": {s: len(v) for s, v in oos.items()}},
        "out_of_scope_by_source": {s: {"home-assistant": len(set(v) - chat), "chatterbot": len(set(v) & chat)}
                                   for s, v in oos.items()},
        "seed": seed,
        "version": VERSION,
    }
