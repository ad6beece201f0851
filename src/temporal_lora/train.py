"""The training recipe: corpora -> document splits -> one adapter per domain -> router -> bundle."""

from __future__ import annotations

import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from temporal_lora.adapters import RESERVED_NAMES, distributed_state, train_adapter
from temporal_lora.backbone import context_length, decoder_layers, fingerprint, load_backbone
from temporal_lora.bundle import MANIFEST
from temporal_lora.config import (
    PRESETS,
    RunContext,
    TrainConfig,
    router_prefix_lengths,
    settings_for,
)
from temporal_lora.conversations import (
    MAX_TOKENS,
    ConversationSplits,
    conversation_rows,
    load_domain_texts,
    mix_rows,
    split_conversations,
    user_turn_ids,
)
from temporal_lora.corpora import BUILTIN_DOMAINS, Document, source_of
from temporal_lora.corpora.sources import PRIMARY, load_source, sources_of
from temporal_lora.corpora.views import questions_in, short_views
from temporal_lora.data import (
    SHORT_CHARS,
    Splits,
    chunk_documents,
    dedupe,
    split_by_kind,
    split_documents,
)
from temporal_lora.errors import CorpusError, FetchError, InputError
from temporal_lora.grounding import (
    PassageIndex,
    conversation_passages,
    document_passages,
    grounded_conversations,
)
from temporal_lora.model import TemporalLoRA
from temporal_lora.routing.abstain import choose_from_replay
from temporal_lora.routing.features import (
    pool_prefixes,
    prefix_features,
    resolve_feature_spec,
    token_features,
)
from temporal_lora.routing.gating import GatingNetwork, fit_router
from temporal_lora.routing.lexical import fit_router_lexical, hashed_rows
from temporal_lora.routing.replay import text_features
from temporal_lora.storage import DEFAULT_EXAMPLE_WEIGHT, example_id
from temporal_lora.synthesis import paraphrased_conversations, synthesised_conversations
from temporal_lora.text import pad_batch, pad_id, separator_id, tokenize

TRAIN_INITS = ("base", "shared")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass
class DomainData:
    name: str
    source: str
    splits: Splits
    dropped_duplicates: int
    conversations: ConversationSplits | None = None  # conversational lines of a user's JSONL
    dropped_conversations: int = 0

    def split_summary(self) -> dict:
        """What the bundle records about this domain's data (data/splits.json): which documents
        (and conversations) are held out."""
        s = self.splits
        conv = self.conversations
        return {"source": self.source, "documents": len(s.train) + len(s.val) + len(s.test),
                "dropped_duplicates": self.dropped_duplicates, "train_documents": len(s.train),
                "val_ids": [d.id for d in s.val], "test_ids": [d.id for d in s.test],
                **({"conversations": conv.summary(self.dropped_conversations)} if conv else {})}


def validate_domains(domains: list[str]) -> list[str]:
    """Check names before any expensive work starts."""
    if not domains:
        raise InputError("no domains given")
    seen = set()
    for name in domains:
        if not _NAME.match(name):
            raise InputError(f"invalid domain name {name!r}: use lowercase letters, digits, '-' and '_'")
        if name in RESERVED_NAMES:
            raise InputError(f"domain name {name!r} is reserved; choose another")
        if name in seen:
            raise InputError(f"domain {name!r} is listed twice")
        seen.add(name)
    return list(domains)


def check_output_dir(out: Path) -> None:
    """Refuse early (before training) to overwrite a directory that is not a bundle."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise InputError(f"output {out} exists and is not a bundle; choose an empty or new directory")


def load_domain_data(name: str, data_paths: dict[str, Path], seed: int) -> DomainData:
    """A domain's documents and conversations, deduplicated and split train/val/test by group (each
    kind on its own, same rule and seed; a domain may have only conversations)."""
    docs, convs = load_domain_texts(name, data_paths)
    unique = dedupe(docs)
    splits = split_by_kind(unique, seed=seed, validated_elsewhere=bool(convs)) if unique else Splits([], [], [])
    conv_splits = split_conversations(convs, seed, f"conversations of {name!r}") if convs else None
    source = source_of(name, data_paths.get(name))
    return DomainData(name, source, splits, len(docs) - len(unique), conv_splits)


GROUNDING_MODES = ("auto", "on", "off")


def grounding_index(dd: DomainData, cfg: TrainConfig, user_data: bool) -> PassageIndex | None:
    """A domain's passage index (grounding.py), or None where it is not grounded: `cfg.grounding`
    'auto' grounds a user's domain that has documents and answered conversations, 'on' every domain
    with documents. Passages: every document of the domain (the handbook is the domain's knowledge,
    whatever split a file landed in; short texts are questions, not knowledge) and the training
    conversations' questions and answers (never the held-out ones)."""
    if cfg.grounding not in GROUNDING_MODES:
        raise InputError(f"unknown grounding {cfg.grounding!r}; choose from {', '.join(GROUNDING_MODES)}")
    convs = dd.conversations.train if dd.conversations else []
    docs = [d for d in (*dd.splits.train, *dd.splits.val, *dd.splits.test) if len(d.text) >= SHORT_CHARS]
    if cfg.grounding == "off" or not docs or (cfg.grounding == "auto" and not (user_data and convs)):
        return None
    passages = [p for d in docs for p in document_passages(d, cfg.passage_words)]
    return PassageIndex.build(passages + conversation_passages(convs))


def ground_training(dd: DomainData, index: PassageIndex, cfg: TrainConfig, tokenizer, max_tokens: int) -> DomainData:
    """The domain's data with its training conversations in the grounded prompt shape (with fewer
    passages where all of them would push the answer past `max_tokens`)."""
    if dd.conversations is None:
        return dd

    def fits(messages: list[dict]) -> bool:
        return len(tokenize(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False), "conversation")) \
            <= max_tokens

    train = grounded_conversations(dd.conversations.train, index, dd.name, cfg.grounding_passages, fits)
    return replace(dd, conversations=replace(dd.conversations, train=train))


def with_written_questions(dd: DomainData, index: PassageIndex, cfg: TrainConfig, model,
                           tokenizer) -> tuple[DomainData, PassageIndex]:
    """A grounded domain's training conversations plus the questions the base model wrote from its
    own data (`cfg.synthetic_questions`, `cfg.paraphrase_questions`; synthesis.py), and its index with
    them as passages too: a written question is one more wording a user's question can match
    (doc2query's idea)."""
    if dd.conversations is None or not (cfg.synthetic_questions or cfg.paraphrase_questions):
        return dd, index
    written = paraphrased_conversations(model, tokenizer, dd.conversations.train, index) \
        if cfg.paraphrase_questions else []
    if cfg.synthetic_questions:
        written += synthesised_conversations(model, tokenizer, index, dd.name, cfg.synthetic_questions,
                                             cfg.grounding_passages)
    dd = replace(dd, conversations=replace(dd.conversations, train=[*dd.conversations.train, *written]))
    return dd, PassageIndex.build(index.passages() + conversation_passages(written)) if written else index


def conversation_tokens(model, tokenizer) -> int:
    """Where conversations are cut: MAX_TOKENS, or the model's context if shorter."""
    return min(MAX_TOKENS, context_length(model, tokenizer))


def training_rows(dd: DomainData, tokenizer, cfg: TrainConfig, max_tokens: int, what: str) -> tuple[list, list]:
    """(document chunks, conversation rows) an adapter trains on: `steps * batch_size` rows at most,
    shared between the kinds (conversations.mix_rows). Documents only: exactly the chunks as before."""
    n = cfg.steps * cfg.batch_size
    if dd.conversations is None:
        return chunks_tensor(dd.splits.train, tokenizer, cfg, n, cfg.seed, what, pack=True).tolist(), []
    chunks = chunk_documents(dd.splits.train, tokenizer, block_size=cfg.block_size, max_chunks=n, seed=cfg.seed,
                             separator=separator_id(tokenizer))
    convs = conversation_rows(tokenizer, dd.conversations.train, max_tokens)
    if not chunks and not convs:
        raise CorpusError(f"{what}: its documents hold fewer than {cfg.block_size} tokens and no conversation "
                          f"has an assistant turn within {max_tokens} tokens")
    return mix_rows(chunks, convs, n, cfg.seed)


def chunks_tensor(docs: list[Document], tokenizer, cfg: TrainConfig, n: int, seed: int, what: str,
                  pack: bool = False) -> torch.Tensor:
    """Up to `n` windows of `docs` [k, block_size]; with `pack`, short documents are packed into
    windows too (adapter training, perplexity), else skipped (router windows: short texts are
    router rows of their own)."""
    chunks = chunk_documents(docs, tokenizer, block_size=cfg.block_size, max_chunks=n, seed=seed,
                             separator=separator_id(tokenizer) if pack else None)
    if not chunks:
        raise CorpusError(f"{what}: no document is at least {cfg.block_size} tokens long" if not pack else
                          f"{what}: its documents hold fewer than {cfg.block_size} tokens in all")
    return torch.tensor(chunks, dtype=torch.long)


def round_robin(chunk_lists: list[list[list[int]]], n: int) -> list[list[int]]:
    """The first `n` windows taken in turn from each list (the shared seed phase's union)."""
    return [row for rows in zip(*chunk_lists, strict=False) for row in rows][:n]


@dataclass
class RouterText:
    """What the router reads of one domain: windows (training / calibration) and short texts."""

    train: torch.Tensor
    calib: torch.Tensor
    short: list[list[int]]
    short_calib: list[list[int]]
    sources: dict  # {source: {"documents", "train_documents", "val_ids", "test_ids"}} (built-in extras)
    turns: list[list[int]] | None = None  # user turns of the training / validation conversations
    turns_calib: list[list[int]] | None = None


def router_text(dd: DomainData, tokenizer, cfg: TrainConfig, builtin: bool, run: RunContext | None = None,
                log: Callable[[str], object] | None = None) -> RouterText:
    """The router's training text of one domain: windows of the training documents (as before), plus,
    for a built-in domain, windows of its other training sources (corpora/sources.py: half as many
    again, shared among them), plus short views and the documents' own questions (`short_texts`);
    and the user turns of its conversations, which is what the router reads at serving time.
    A source that cannot be read is skipped with a line to `run.log` (`log`, if given, overrides it)."""
    run = RunContext.of(run, log=log)
    turns = turns_calib = None
    if dd.conversations is not None:
        turns = user_turn_ids(tokenizer, dd.conversations.train, cfg.router.max_tokens)
        turns_calib = user_turn_ids(tokenizer, dd.conversations.val, cfg.router.max_tokens)
    primary = dd.splits
    if not builtin:  # a user's short documents (requests, questions, FAQ headings): every one a router row
        (train_docs, short), (val_docs, short_calib) = (short_documents(d, tokenizer, cfg)
                                                        for d in (primary.train, primary.val))
        turns, turns_calib = (turns or []) + short or None, (turns_calib or []) + short_calib or None
        primary = Splits(train_docs, val_docs, primary.test)
    train = _windows_of(primary.train, tokenizer, cfg, cfg.router_chunks, cfg.seed + 1, dd.name, turns)
    calib = _windows_of(primary.val, tokenizer, cfg, cfg.calib_chunks, cfg.seed, f"{dd.name} val split",
                        turns_calib)
    splits = {"primary": primary}
    sources: dict = {}
    extras = [s for s in sources_of(dd.name) if s.name != PRIMARY.get(dd.name)] \
        if builtin and cfg.router.extra_sources and dd.name in BUILTIN_DOMAINS else []
    more_train, more_calib = [train], [calib]
    for src in extras:
        try:
            docs = dedupe(load_source(src.name))
            sp = split_documents(docs, seed=cfg.seed)
        except (CorpusError, FetchError) as exc:  # e.g. no apt-get here: the router trains without it
            run.log(f"router source {src.name!r} of {dd.name!r} skipped: {exc}")
            sources[src.name] = {"skipped": str(exc)}
            continue
        n, m = max(1, cfg.router_chunks // (2 * len(extras))), max(1, cfg.calib_chunks // (2 * len(extras)))
        for docs_, k, seed, out in ((sp.train, n, cfg.seed + 1, more_train),
                                    (sp.val, m, cfg.seed, more_calib)):
            chunks = chunk_documents(docs_, tokenizer, block_size=cfg.block_size, max_chunks=k, seed=seed)
            if chunks:
                out.append(torch.tensor(chunks, dtype=torch.long))
        splits[src.name] = sp
        sources[src.name] = {"documents": len(docs), "train_documents": len(sp.train),
                             "val_ids": [d.id for d in sp.val], "test_ids": [d.id for d in sp.test]}
    short = _short_texts(tokenizer, [s.train for s in splits.values()], cfg.router.short_texts, cfg)
    short_calib = _short_texts(tokenizer, [s.val for s in splits.values()], cfg.router.short_texts // 5, cfg)
    return RouterText(torch.cat(more_train), torch.cat(more_calib), short, short_calib, sources, turns, turns_calib)


def short_documents(docs: list[Document], tokenizer, cfg: TrainConfig) -> tuple[list[Document], list[list[int]]]:
    """(the documents of at least one training window, token ids of the shorter ones, each cut to the
    router's `max_tokens`)."""
    long, short = [], []
    for doc in docs:
        if len(doc.text) > 16 * cfg.block_size:  # surely a window or more: not worth tokenizing here
            long.append(doc)
            continue
        ids = tokenize(tokenizer, doc.text, f"document {doc.id}")
        if len(ids) >= cfg.block_size:
            long.append(doc)
        elif ids:
            short.append(ids[: cfg.router.max_tokens])
    return long, short


def _windows_of(docs: list[Document], tokenizer, cfg: TrainConfig, n: int, seed: int, what: str,
                turns: list | None) -> torch.Tensor:
    """Router windows of `docs`; none (instead of an error) when user turns stand in for them."""
    if turns:
        chunks = chunk_documents(docs, tokenizer, block_size=cfg.block_size, max_chunks=n, seed=seed)
        return torch.tensor(chunks, dtype=torch.long) if chunks else torch.zeros((0, cfg.block_size), dtype=torch.long)
    return chunks_tensor(docs, tokenizer, cfg, n, seed, what)


@torch.no_grad()
def turn_features(model, spec: str, turns: list[list[int]], lengths: list[int], pad_id: int,
                  batch_size: int = 16) -> torch.Tensor:
    """Router features [len(lengths), n, dim] of user turns: each prefix length reads the turn's
    first min(length, len(turn)) tokens, as routing reads a prompt of that many tokens."""
    out = []
    for start in range(0, len(turns), batch_size):
        ids, mask = pad_batch(turns[start:start + batch_size], pad_id, left=False)
        out.append(pool_prefixes(token_features(model, spec, ids, mask), mask, lengths))
    return torch.cat(out, dim=1)


def router_features(model, spec: str, rt: RouterText, lengths: list[int], pad_id: int,
                    min_rows: int = 0, with_short: bool = True,
                    rows: dict[str, list[list[int]]] | None = None) -> dict[str, torch.Tensor]:
    """A domain's router features (routing/replay.py's layout): windows and short texts, with the
    conversations' user turns (and a user corpus's short documents) as more "train" / "calib" rows.
    A domain without windows repeats its training turns up to `min_rows`, so its class is not a small
    minority; its turns, read whole, are also its short texts when the router trains on short texts
    (`with_short`). `rows`, if given, is filled with the token ids each feature row read, in the
    features' row order ([L, n] flattened length by length): what the lexical head reads."""
    out: dict[str, torch.Tensor] = {}
    ids: dict[str, list] = {}  # part -> per prefix length, the token rows (windows, turns) it read
    for part, chunks in (("train", rt.train), ("calib", rt.calib)):
        if len(chunks):
            out[part] = prefix_features(model, spec, chunks, lengths)
            windows = chunks.tolist()
            ids[part] = [[row[:n] for row in windows] for n in lengths]
    for part, seqs in (("short", rt.short), ("short_calib", rt.short_calib)):
        if seqs:
            out[part] = text_features(model, spec, seqs, pad_id)
            ids[part] = list(seqs)
    whole, whole_ids = {}, {}
    for part, turns in (("train", rt.turns), ("calib", rt.turns_calib)):
        if not turns:
            continue
        feats = turn_features(model, spec, turns, lengths, pad_id)
        short_part = "short" if part == "train" else "short_calib"
        whole[short_part], whole_ids[short_part] = feats[-1], list(turns)
        order = list(range(len(turns)))
        if part == "train" and part not in out and feats.shape[1] < min_rows:
            order = [i % len(turns) for i in range(min_rows)]
            feats = feats[:, torch.tensor(order)]
        prefixes = [[turns[i][:n] for i in order] for n in lengths]
        out[part] = torch.cat([out[part], feats], dim=1) if part in out else feats
        ids[part] = [a + b for a, b in zip(ids[part], prefixes, strict=True)] if part in ids else prefixes
    if with_short and "short" not in out and len(whole) == 2:
        out.update(whole)
        ids.update(whole_ids)
    if "train" not in out or "calib" not in out:
        raise CorpusError("the router needs training and validation text of every domain")
    if rows is not None:
        rows.update({part: [r for per_length in v for r in per_length] if part in ("train", "calib") else v
                     for part, v in ids.items()})
    return out


def _short_texts(tokenizer, doc_lists: list[list[Document]], limit: int, cfg: TrainConfig) -> list[list[int]]:
    """Up to `limit` short texts (token ids, at most the router's max_tokens), taken in turn from
    each source's documents: short views, and about one in four the documents' own questions."""
    if limit <= 0:
        return []
    rng = random.Random(cfg.seed)
    pools = []
    for docs in doc_lists:
        docs = list(docs)
        rng.shuffle(docs)
        views, questions = [], []
        for doc in docs[:400]:  # bounded: PubMed has ~25k training abstracts
            views += short_views(doc.text, limit=3, seed=cfg.seed)
            questions += questions_in(doc.text)[:2]
        rng.shuffle(views)
        rng.shuffle(questions)
        pools.append(questions[: max(1, limit // (4 * len(doc_lists)))] + views)
    out: list[list[int]] = []
    seen: set[str] = set()
    while len(out) < limit and any(pools):
        for pool in pools:
            if pool and len(out) < limit:
                text = pool.pop(0)
                ids = tokenize(tokenizer, text, "router text")[: cfg.router.max_tokens]
                if ids and text not in seen:
                    seen.add(text)
                    out.append(ids)
    return out


def train_router(tl_model, tokenizer, spec: str, domain_chunks: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 cfg: TrainConfig, replay: dict | None = None,
                 short: dict[str, tuple[list, list]] | None = None,
                 turns: dict[str, tuple[list, list]] | None = None,
                 lexical: dict | None = None) -> tuple[GatingNetwork, dict]:
    """Train the gating network on prefixes of training chunks; calibrate on validation chunks.

    With `replay` (a dict), each domain's features are also put there: the bundle keeps them so
    that adding or removing a domain later refits the router without the old domains' raw text.
    With `lexical` (a dict) and `cfg.router.lexical`, the lexical head is fitted on the same rows
    and put there as "head", with each domain's rows as hashed counts as "rows" (its replay memory).
    """
    lengths = router_prefix_lengths(cfg.router, cfg.block_size)
    short = short or {}
    pad = pad_id(tokenizer)
    turns = turns or {}
    rows: dict[str, dict] = {}
    features = {name: router_features(tl_model, spec, RouterText(train_chunks, calib_chunks,
                                                                 *short.get(name, (None, None)), {},
                                                                 *turns.get(name, (None, None))),
                                      lengths, pad, min_rows=cfg.router_chunks,
                                      with_short=cfg.router.short_texts > 0, rows=rows.setdefault(name, {}))
                for name, (train_chunks, calib_chunks) in domain_chunks.items()}
    net, summary = fit_router(features, cfg.router, seed=cfg.seed)
    if replay is not None:
        replay.update(features)
    if lexical is not None and cfg.router.lexical:
        hashed = {name: hashed_rows(tokenizer, r) for name, r in rows.items()}
        head, lex_summary = fit_router_lexical(net, features, hashed, seed=cfg.seed)
        lexical.update(head=head, rows=hashed)
        summary["lexical"] = lex_summary
    return net, {"examples": summary["examples"], "calibration_examples": summary["calibration_examples"],
                 "prefix_lengths": lengths, **summary}


def choose_abstain(tl: TemporalLoRA, out_of_scope: list[str]) -> None:
    """Choose a trained bundle's abstain threshold on its calibration rows and the out-of-scope
    texts (routing/abstain.py), and keep those texts as route examples of 'none' (no router class:
    the rows every later refit chooses the threshold on again)."""
    texts = list(dict.fromkeys(t.strip() for t in out_of_scope if t.strip()))
    # Features as the bundle stores them (float16) and the texts as stored: every later refit
    # chooses on exactly these rows, and so chooses the same threshold.
    feats = tl.route_features(tl.encode(texts)).to(torch.float16) if texts else None
    stored = {d: {part: t.to(torch.float16) for part, t in f.items()} for d, f in tl.replay.items()}
    lengths = tl.info["router_training"]["prefix_lengths"]
    threshold, report = choose_from_replay(tl.router, stored, lengths,
                                           None if feats is None else feats.float(), lexical=tl.lexical,
                                           lexical_rows=tl.lexical_replay, oos_texts=texts)
    tl.router_config.abstain_threshold = threshold
    tl.info["router_training"]["abstain"] = report
    if texts:
        items = [{"id": example_id("none", t), "domain": "none", "text": t} for t in texts]
        tl.examples = (items, {i["id"]: f for i, f in zip(items, feats, strict=True)}, DEFAULT_EXAMPLE_WEIGHT)


def train_bundle(
    domains: list[str],
    out: str | Path,
    *,
    base: str | None = None,
    data: dict[str, Path] | None = None,
    budget: str | None = None,
    seed: int | None = None,
    router_features: str | None = None,
    abstain_threshold: float | str | None = None,
    out_of_scope: list[str] | None = None,
    grounding: str | None = None,
    config: TrainConfig | None = None,
    init: str = "base",
    run: RunContext | None = None,
    progress: bool | None = None,
    log: Callable[[str], object] | None = None,
) -> TemporalLoRA:
    """Train one adapter per domain on the frozen base, then the router; save the bundle to `out`.

    `init="shared"` first trains one adapter for `steps` steps on the union of the domains' training
    chunks (Branch-Train-Merge's seed phase) and starts every domain's adapter from it; `"base"`
    starts each from a fresh LoRA. The manifest records each adapter's init.

    Settings: `config`, or preset `budget` (default quick, config.PRESETS) with `seed` (default 0); a
    budget or seed that disagrees with a given config is an InputError (config.settings_for), never
    silently dropped. `router_features` and `abstain_threshold` are applied over either. `run` says
    how to report (progress bars, log lines); `progress`/`log`, if given, override its fields.

    `abstain_threshold="auto"` chooses the threshold on validation data (routing/abstain.py): the
    domains' calibration rows and `out_of_scope` (texts no domain should answer), which the bundle
    keeps as route examples of 'none' so that every later refit chooses it again the same way.

    `grounding` (auto, on, off; default the config's, auto): which domains answer from their own
    passages (grounding.py, `grounding_index`); the bundle stores their indexes.
    """
    if init not in TRAIN_INITS:
        raise InputError(f"unknown init {init!r}; choose from {', '.join(TRAIN_INITS)}")
    out = Path(out)
    data = {k: Path(v) for k, v in (data or {}).items()}
    domains = validate_domains(list(domains))
    for name in data:
        if name not in domains:
            raise InputError(f"--data names domain {name!r} which is not in --domains")
    check_output_dir(out)
    cfg = settings_for(config, budget, seed, PRESETS)
    run = RunContext.of(run, progress=progress, log=log)
    if isinstance(abstain_threshold, str) and abstain_threshold != "auto":
        raise InputError(f"abstain threshold must be a number or 'auto', not {abstain_threshold!r}")
    auto = abstain_threshold == "auto"
    if out_of_scope and not auto:
        raise InputError("out-of-scope texts choose the abstain threshold: pass abstain_threshold='auto' with them")
    overrides = {k: v for k, v in (("features", router_features),
                                   ("abstain_threshold", None if auto else abstain_threshold),
                                   ("abstain_auto", True if auto else None))
                 if v is not None and v != ""}
    if overrides:  # a copy: the caller's config stays as it was
        cfg = replace(cfg, router=replace(cfg.router, **overrides))
    if grounding is not None:
        cfg = replace(cfg, grounding=grounding)
    timing: dict[str, float] = {}

    t0 = time.perf_counter()
    datasets = {name: load_domain_data(name, data, cfg.seed) for name in domains}  # fail fast on bad corpora
    indexes = {name: grounding_index(dd, cfg, name in data) for name, dd in datasets.items()}
    grounded = {name: index for name, index in indexes.items() if index is not None}
    timing["load_corpora"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model, tokenizer, base_id = load_backbone(base)
    base_fp = fingerprint(model)
    spec = resolve_feature_spec(cfg.router.features, len(decoder_layers(model)))
    timing["load_base_model"] = time.perf_counter() - t0
    for name, index in list(grounded.items()):
        before = len(datasets[name].conversations.train) if datasets[name].conversations else 0
        dd, index = with_written_questions(datasets[name], index, cfg, model, tokenizer)
        grounded[name] = index
        datasets[name] = ground_training(dd, index, cfg, tokenizer, conversation_tokens(model, tokenizer))
        written = len(dd.conversations.train) - before if dd.conversations else 0
        run.log(f"grounding '{name}': {index.size} passages; its training answers see the top "
                f"{cfg.grounding_passages} for their question" + (f"; {written} questions written by the "
                                                                 "base model" if written else ""))

    training, splits_info, router_data, router_short, router_turns = {}, {}, {}, {}, {}
    # Adapters are staged next to the output; under `accelerate launch` every process must see the
    # same folder (the main process writes each adapter, all of them load it), so the name is fixed.
    state = distributed_state()
    work = out.parent / f".{out.name}.adapters-work"
    if state.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    state.wait_for_everyone()
    try:
        train_chunks, train_convs = {}, {}
        for name, dd in datasets.items():
            t0 = time.perf_counter()
            train_chunks[name], train_convs[name] = training_rows(dd, tokenizer, cfg, conversation_tokens(
                model, tokenizer), f"{name} train split")
            rt = router_text(dd, tokenizer, cfg, builtin=name not in data, run=run)
            router_data[name] = (rt.train, rt.calib)
            router_short[name] = (rt.short, rt.short_calib)
            router_turns[name] = (rt.turns, rt.turns_calib)
            splits_info[name] = dd.split_summary() | ({"router_sources": rt.sources} if rt.sources else {})
            timing[f"chunk_{name}"] = time.perf_counter() - t0
        seed_dir, seed_info = None, {"init": "base"}
        if init == "shared":
            # Round-robin over the domains, so every step of the seed phase sees all of them.
            n_union = cfg.steps * cfg.batch_size
            union = round_robin([c for c in train_chunks.values() if c], n_union)
            union, union_convs = mix_rows(union, round_robin([c for c in train_convs.values() if c], n_union),
                                          n_union, cfg.seed)
            run.log(f"shared seed phase: one adapter on the union of {len(domains)} domains ({cfg.steps} steps)")
            t0 = time.perf_counter()
            seed_dir = work / ".shared-seed"  # '.' starts no domain name
            train_adapter(model, union, seed_dir, cfg, desc="shared", run=run, conversations=union_convs)
            timing["adapter_shared_seed"] = time.perf_counter() - t0
            seed_info = {"init": "shared", "shared_steps": cfg.steps}
        for i, (name, dd) in enumerate(datasets.items()):
            convs = f" and {len(train_convs[name])} conversations" if train_convs[name] else ""
            run.log(f"[{i + 1}/{len(datasets)}] training adapter '{name}' on {len(train_chunks[name])} chunks "
                f"of {cfg.block_size} tokens{convs} ({cfg.steps} steps)")
            t0 = time.perf_counter()
            summary = train_adapter(model, train_chunks[name], work / name, cfg, desc=name,
                                    run=run, init_from=seed_dir, conversations=train_convs[name])
            timing[f"adapter_{name}"] = time.perf_counter() - t0
            training[name] = summary | {"source": dd.source, "seed": cfg.seed} | seed_info
        if fingerprint(model) != base_fp:  # adapters must never touch the base
            raise RuntimeError("base model weights changed during adapter training")

        run.log(f"training router on '{spec}' features")
        t0 = time.perf_counter()
        replay: dict = {}
        lexical: dict = {}
        router, router_summary = train_router(model, tokenizer, spec, router_data, cfg, replay=replay,
                                              short=router_short, turns=router_turns, lexical=lexical)
        timing["router"] = time.perf_counter() - t0

        info = {"training": training, "router_training": router_summary, "data": splits_info,
                "train_config": cfg.to_dict(), "timing": {k: round(v, 2) for k, v in timing.items()},
                "history": [{"version": 1, "time": datetime.now(UTC).isoformat(timespec="seconds"),
                             "change": "train", "domains": list(domains)}]}
        tl = TemporalLoRA.assemble(model, tokenizer, base_id=base_id, adapter_dirs={d: work / d for d in domains},
                                   router=router, router_config=cfg.router, feature_spec=spec, info=info,
                                   base_fingerprint=base_fp)
        tl.replay = replay
        tl.lexical, tl.lexical_replay = lexical.get("head"), lexical.get("rows")
        tl.grounding, tl.grounding_passages = grounded, cfg.grounding_passages if grounded else 0
        if cfg.router.abstain_auto:
            choose_abstain(tl, out_of_scope or [])
        t0 = time.perf_counter()
        # Under `accelerate launch` every process gets here with identical weights; one writes
        # (the others wait for it at the barrier below before returning).
        if state.is_main_process:
            tl.save_pretrained(out)
        tl.info["timing"]["save_bundle"] = round(time.perf_counter() - t0, 2)
    finally:
        state.wait_for_everyone()
        if state.is_main_process:
            shutil.rmtree(work, ignore_errors=True)
    return tl
