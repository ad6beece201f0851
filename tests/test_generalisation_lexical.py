"""The generalisation bench's lexical variant (benchmarks/generalisation.py, variant 6): the rows' texts
line up with their features, the joint head reads them, and the other heads are untouched."""

import pytest
import torch

from benchmarks.generalisation import (
    VARIANTS,
    LexicalJointHead,
    MlpHead,
    _row_texts,
    _rows,
    evaluate_head,
    fit_variant,
    train_names,
)
from temporal_lora.config import EVAL_LENGTHS

WORDS = {"medical": "patient dose clinical trial symptom therapy", "legal": "licence warranty clause party liability"}
SOURCES = {"medical": ("pubmed", "icd10cm"), "legal": ("spdx", "debian-copyright")}


def _toy(dim: int = 6):
    """Two domains: one training source each (train/calib/test windows, train views) and a held-out one."""
    gen = torch.Generator().manual_seed(0)
    sets, feats, texts = {}, {}, {}
    for k, (domain, (primary, held_out)) in enumerate(SOURCES.items()):
        words = WORDS[domain].split()
        for name, kind, n in ((f"{primary}:train", "windows", 12), (f"{primary}:calib", "windows", 4),
                              (f"{primary}:test", "windows", 4), (f"{primary}:train_views", "texts", 6),
                              (f"{held_out}:cross", "windows", 5), (f"{held_out}:cross_views", "texts", 3)):
            sets[name] = {"domain": domain, "source": name.split(":")[0], "kind": kind, "items": [[0]] * n}
            shape = (len(EVAL_LENGTHS), n, dim) if kind == "windows" else (n, dim)
            feats[name] = {layer: (torch.randn(shape, generator=gen) + 4 * k).half() for layer in (8, 12)}
            def make(i, n=n, words=words):  # distinct per prefix length i
                return [" ".join(words[(i + j) % len(words):][:1 + i]) or words[0] for j in range(n)]
            texts[name] = [make(i) for i in range(len(EVAL_LENGTHS))] if kind == "windows" else make(0)
    return sets, feats, texts


def test_row_texts_follow_the_feature_rows():
    sets, feats, texts = _toy()
    names = [n for n in sets if n.endswith((":train", ":train_views"))]
    x, _ = _rows(sets, feats, names, (8, 12), list(SOURCES))
    rows = _row_texts(feats, texts, names)
    assert len(rows) == len(x)
    # windows flatten as [L, n]: length-major, as the features' flatten(0, 1)
    n = len(sets["pubmed:train"]["items"])
    assert rows[:n] == texts["pubmed:train"][0] and rows[n:2 * n] == texts["pubmed:train"][1]


def test_lexical_variant_reads_the_texts_and_the_alone_view_shares_its_fit():
    sets, feats, texts = _toy()
    domains = list(SOURCES)
    v6 = next(v for v in VARIANTS if v["head"] == "lexical")
    assert train_names(sets, v6)[0]
    head = fit_variant(sets, feats, v6, domains, texts=texts)
    assert isinstance(head, LexicalJointHead) and isinstance(head.mlp, MlpHead)
    assert head.summary["rows"] == len(_rows(sets, feats, train_names(sets, v6)[0], (8, 12), domains)[0])
    res = evaluate_head(head, sets, feats, v6["layers"], domains, texts=texts)
    assert res["cross_source"]["128"] == 1.0 and res["cross_source_short_views"] == 1.0
    alone = head.lexical_alone()
    assert alone.alone and not head.alone and alone.lexical is head.lexical
    assert evaluate_head(alone, sets, feats, v6["layers"], domains, texts=texts)["in_source"]["128"] == 1.0
    with pytest.raises(ValueError, match="text"):
        evaluate_head(head, sets, feats, v6["layers"], domains)  # no texts
    with pytest.raises(ValueError, match="text"):
        fit_variant(sets, feats, v6, domains)
    # the feature-only heads ignore the texts
    mlp = fit_variant(sets, feats, next(v for v in VARIANTS if v["change"] == "5d layers 8+12"), domains)
    assert evaluate_head(mlp, sets, feats, (8, 12), domains) == evaluate_head(mlp, sets, feats, (8, 12), domains,
                                                                              texts=texts)
