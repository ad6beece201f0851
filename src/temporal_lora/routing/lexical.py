"""The router's lexical head: the input's word and character n-grams, beside the hidden-state head.

A short request is often decided by a word or two ("refund", "thermostat", "flight"). On short
requests a bag of n-grams with logistic regression beat the pooled hidden states alone (issue 25),
and the two make different mistakes, so the router uses both as a product of experts:

    log p(d | x)  =  log p_hidden(d | x) + w * s_lexical(d | x)   (then renormalised, / temperature)

`w` and the temperature are chosen on the calibration rows (held-out validation text), so the
lexical head counts only as much as it helps on text the router never trained on (w = 0: not at all).

N-grams are hashed (scikit-learn's HashingVectorizer): there is no vocabulary to store, and the
replay memory keeps each router row as hashed counts, never as text, so add-domain / remove-domain /
route examples refit the head without the old domains' raw text. Everything is stored as
safetensors (weights of the features training used, idf) plus JSON settings; nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression
from torch import nn

from temporal_lora.errors import BundleError
from temporal_lora.routing.gating import fit_temperature

# Combination weights tried on the calibration rows (0 = hidden-state head alone).
WEIGHTS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


@dataclass(frozen=True)
class LexicalSettings:
    """How text becomes n-gram features; recorded in the bundle so routing hashes as training did."""

    n_features: int = 2**18
    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (3, 5)  # within word boundaries: robust to inflection and typos
    C: float = 10.0  # inverse L2 strength of the logistic regression

    def vectorizers(self) -> list[HashingVectorizer]:
        common = {"n_features": self.n_features, "alternate_sign": False, "norm": None, "lowercase": True}
        out = [HashingVectorizer(analyzer="word", ngram_range=tuple(self.word_ngrams), **common)]
        if self.char_ngrams[1] > 0:
            out.append(HashingVectorizer(analyzer="char_wb", ngram_range=tuple(self.char_ngrams), **common))
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> LexicalSettings:
        return cls(n_features=int(raw["n_features"]), word_ngrams=tuple(raw["word_ngrams"]),
                   char_ngrams=tuple(raw["char_ngrams"]), C=float(raw["C"]))


def hash_texts(texts: list[str], settings: LexicalSettings = LexicalSettings()) -> sp.csr_matrix:
    """Hashed n-gram counts [n, n_features] (word and character n-grams in one space)."""
    parts = [v.transform(texts) for v in settings.vectorizers()]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return sp.csr_matrix(total, dtype=np.float32)


def decode_rows(tokenizer, rows: list[list[int]]) -> list[str]:
    """The text of router rows (token ids), as the lexical head reads it."""
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


class LexicalHead:
    """tf-idf of hashed n-grams -> multinomial logistic regression -> scores per domain, and the
    weight and temperature that join them to the hidden-state head."""

    def __init__(self, settings: LexicalSettings, columns: np.ndarray, coef: np.ndarray, intercept: np.ndarray,
                 idf: np.ndarray, weight: float, temperature: float, n_classes: int):
        self.settings = settings
        self.columns = columns.astype(np.int64)  # hashed features seen in training; all others weigh 0
        self.coef, self.intercept, self.idf = coef.astype(np.float32), intercept.astype(np.float32), idf.astype(np.float32)
        self.weight, self.temperature, self.n_classes = float(weight), float(temperature), int(n_classes)

    def scores(self, counts: sp.csr_matrix) -> torch.Tensor:
        """Logistic-regression scores [n, n_classes] of hashed counts."""
        x = tfidf(counts[:, self.columns], self.idf)
        return torch.from_numpy(np.asarray(x @ self.coef.T) + self.intercept).float()

    def combine(self, hidden_log_probs: torch.Tensor, counts: sp.csr_matrix) -> torch.Tensor:
        """Calibrated probabilities [n, n_classes] of the two heads together (rows' hashed counts).

        In float64: the joint heads are often sure, and float32 rounds every probability above
        1 - 6e-8 to exactly 1, which would leave the abstain threshold nothing to tell apart."""
        z = hidden_log_probs.double()
        if self.weight != 0.0:
            z = z + self.weight * self.scores(counts).double()
        return no_surer_than(torch.softmax(z / self.temperature, dim=-1), hidden_log_probs.double().exp())


def no_surer_than(probs: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """`probs` shrunk toward uniform, row by row, so that their top probability is no higher than the
    hidden-state head's own (`hidden`): the lexical head may change which domain wins, never make the
    router surer than the hidden states are. A request that merely shares a department's words ("what's
    the weather in the living room") gets a confident lexical score; the hidden states are what tell it
    apart from the department's requests, and the abstain threshold reads this confidence. The
    shrinking is affine, so the order of the domains, and the route, are the joint head's."""
    k = probs.shape[-1]
    top = probs.max(dim=-1, keepdim=True).values
    cap = torch.minimum(top, hidden.max(dim=-1, keepdim=True).values)
    keep = torch.where(top > 1 / k, (cap - 1 / k) / (top - 1 / k).clamp(min=1e-300), torch.ones_like(top))
    return keep * probs + (1 - keep) / k


@torch.no_grad()
def joint_probs(net, feats: torch.Tensor, lexical: LexicalHead | None = None,
                counts: sp.csr_matrix | None = None) -> torch.Tensor:
    """The router's calibrated probabilities: the gating network `net` on pooled features, joined
    with the lexical head on the same rows' hashed counts where the bundle has one."""
    if lexical is None:
        return net(feats.float())
    return lexical.combine(torch.log_softmax(net.logits(feats.float()).double() / net.temperature, dim=-1), counts)


def tfidf(counts: sp.csr_matrix, idf: np.ndarray) -> sp.csr_matrix:
    """Sublinear tf (1 + log count) times idf, rows L2-normalised (scikit-learn's TfidfTransformer)."""
    x = counts.astype(np.float32).tocsr(copy=True)
    x.data = 1.0 + np.log(x.data)
    x = x.multiply(idf.reshape(1, -1)).tocsr()
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    return sp.diags(1.0 / np.maximum(norms, 1e-12)) @ x


def fit_lexical(train: sp.csr_matrix, labels: np.ndarray, calib: sp.csr_matrix, calib_labels: np.ndarray,
                hidden_calib_log_probs: torch.Tensor, n_classes: int, *, weights: np.ndarray | None = None,
                settings: LexicalSettings = LexicalSettings(), seed: int = 0) -> tuple[LexicalHead, dict]:
    """Fit the lexical head on the router's training rows (hashed counts, labels, optional row weights),
    then the product-of-experts weight and temperature on the calibration rows, where the hidden-state
    head's calibrated log-probabilities are given in the same row order."""
    columns = np.unique(train.indices)
    x = train[:, columns]
    df = np.bincount(x.indices, minlength=len(columns)).astype(np.float64)
    idf = (np.log((1 + x.shape[0]) / (1 + df)) + 1.0).astype(np.float32)  # smooth idf, as scikit-learn's
    model = LogisticRegression(C=settings.C, max_iter=2000, random_state=seed)
    model.fit(tfidf(x, idf), labels, sample_weight=weights)
    coef = np.zeros((n_classes, len(columns)), np.float32)
    intercept = np.full(n_classes, -1e4, np.float32)  # a class without training rows is never chosen
    coef[model.classes_] = model.coef_ if len(model.classes_) > 2 else _binary_coef(model)
    intercept[model.classes_] = model.intercept_ if len(model.classes_) > 2 else _binary_intercept(model)
    head = LexicalHead(settings, columns, coef, intercept, idf, 0.0, 1.0, n_classes)
    scores = head.scores(calib)
    y = torch.as_tensor(calib_labels, dtype=torch.long)
    best = None
    for w in WEIGHTS:
        z = hidden_calib_log_probs.double() + w * scores.double()
        temperature, nll = fit_temperature(z, y)
        if best is None or nll < best[2] - 1e-6:
            best = (w, temperature, nll)
    head.weight, head.temperature = best[0], best[1]
    with torch.no_grad():
        hidden_acc = float((hidden_calib_log_probs.argmax(-1) == y).float().mean())
        lexical_acc = float((scores.argmax(-1) == y).float().mean())
        joint_acc = float(((hidden_calib_log_probs + head.weight * scores).argmax(-1) == y).float().mean())
        hidden_nll = float(nn.functional.cross_entropy(hidden_calib_log_probs.double(), y))
    summary = {"rows": int(train.shape[0]), "features_used": int(len(columns)), "weight": head.weight,
               "temperature": round(head.temperature, 4), "calibration_nll": round(best[2], 4),
               "calibration_nll_hidden_only": round(hidden_nll, 4),
               "calibration_accuracy": {"hidden": round(hidden_acc, 4), "lexical": round(lexical_acc, 4),
                                        "joint": round(joint_acc, 4)},
               "settings": asdict(settings)}
    return head, summary


def _binary_coef(model: LogisticRegression) -> np.ndarray:
    # scikit-learn keeps one row for two classes (the second class's score); split it symmetrically.
    return np.concatenate([-model.coef_ / 2, model.coef_ / 2])


def _binary_intercept(model: LogisticRegression) -> np.ndarray:
    return np.concatenate([-model.intercept_ / 2, model.intercept_ / 2])


# ------------------------------------------------------------------------------------------ storage
def save_lexical(head: LexicalHead, path: Path) -> None:
    tensors = {"columns": head.columns, "coef": head.coef, "intercept": head.intercept, "idf": head.idf}
    meta = {"lexical": json.dumps({"settings": asdict(head.settings), "weight": head.weight,
                                   "temperature": head.temperature, "n_classes": head.n_classes})}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=meta)


def load_lexical(path: Path, n_classes: int) -> LexicalHead:
    try:
        with safe_open(str(path), framework="np") as fh:
            info = json.loads((fh.metadata() or {})["lexical"])
            t = {k: fh.get_tensor(k) for k in ("columns", "coef", "intercept", "idf")}
        head = LexicalHead(LexicalSettings.from_dict(info["settings"]), t["columns"], t["coef"], t["intercept"],
                           t["idf"], info["weight"], info["temperature"], info["n_classes"])
    except (OSError, KeyError, ValueError, TypeError, SafetensorError) as exc:
        raise BundleError(f"router lexical head {path} is unreadable: {exc}") from exc
    if head.n_classes != n_classes or head.coef.shape != (n_classes, len(head.columns)):
        raise BundleError(f"router lexical head {Path(path).name} does not match the manifest's {n_classes} domains")
    return head


def save_lexical_replay(path: Path, rows: dict[str, dict[str, sp.csr_matrix]]) -> None:
    """Each domain's router rows as hashed counts (CSR parts), keyed '<domain>.<part>.<array>'."""
    tensors = {}
    for domain, parts in rows.items():
        for part, m in parts.items():
            m = sp.csr_matrix(m)
            tensors[f"{domain}.{part}.indptr"] = m.indptr.astype(np.int64)
            tensors[f"{domain}.{part}.indices"] = m.indices.astype(np.int32)
            tensors[f"{domain}.{part}.data"] = m.data.astype(np.float32)
    meta = {"lexical_replay": json.dumps({"domains": {d: list(p) for d, p in rows.items()},
                                          "n_features": int(next(iter(next(iter(rows.values())).values())).shape[1])})}
    save_file(tensors, str(path), metadata=meta)


def load_lexical_replay(path: Path) -> dict[str, dict[str, sp.csr_matrix]]:
    try:
        with safe_open(str(path), framework="np") as fh:
            info = json.loads((fh.metadata() or {})["lexical_replay"])
            width = int(info["n_features"])
            out = {}
            for domain, parts in info["domains"].items():
                out[domain] = {}
                for part in parts:
                    indptr = fh.get_tensor(f"{domain}.{part}.indptr")
                    out[domain][part] = sp.csr_matrix((fh.get_tensor(f"{domain}.{part}.data"),
                                                       fh.get_tensor(f"{domain}.{part}.indices"), indptr),
                                                      shape=(len(indptr) - 1, width))
    except (OSError, KeyError, ValueError, TypeError, SafetensorError) as exc:
        raise BundleError(f"router lexical replay memory {path} is unreadable: {exc}") from exc
    return out


# ------------------------------------------------------------------------------------------ with the router
def hashed_rows(tokenizer, rows: dict[str, list[list[int]]],
                settings: LexicalSettings = LexicalSettings()) -> dict[str, sp.csr_matrix]:
    """A domain's router rows (token ids per part, in the features' row order) as hashed counts."""
    return {part: hash_texts(decode_rows(tokenizer, ids), settings) for part, ids in rows.items()}


def stacked(parts: dict, first: str, second: str):
    """A domain's rows of one role in the router's order: the windows/turns part, then short texts."""
    return sp.vstack([parts[first], *([parts[second]] if second in parts else [])]).tocsr()


def fit_router_lexical(net, features: dict[str, dict[str, torch.Tensor]], rows: dict[str, dict[str, sp.csr_matrix]],
                       *, seed: int = 0, examples: dict[str, sp.csr_matrix] | None = None,
                       example_weight: float = 1.0,
                       settings: LexicalSettings = LexicalSettings()) -> tuple[LexicalHead | None, dict]:
    """The lexical head for a fitted gating network `net`: trained on the same rows as `net`
    (`rows[name]` holds hashed counts laid out as `features[name]`), class-balanced, with a user's
    route examples counting `example_weight` rows each; joined on the calibration rows."""
    names = list(features)
    if len(names) < 2:
        return None, {"skipped": "one class"}
    train, labels, calib, calib_labels, hidden = [], [], [], [], []
    for label, name in enumerate(names):
        f, r = features[name], rows[name]
        x, c = stacked(r, "train", "short"), stacked(r, "calib", "short_calib")
        n_f = f["train"].shape[0] * f["train"].shape[1] + (len(f["short"]) if "short" in f else 0)
        if x.shape[0] != n_f:
            raise RuntimeError(f"lexical rows of {name!r} ({x.shape[0]}) do not match its router rows ({n_f})")
        train.append(x)
        labels.append(np.full(x.shape[0], label))
        calib.append(c)
        calib_labels.append(np.full(c.shape[0], label))
        hidden.append(torch.cat([f["calib"].float().flatten(0, 1),
                                 *([f["short_calib"].float()] if "short_calib" in f else [])]))
    y = np.concatenate(labels)
    counts = np.bincount(y, minlength=len(names)).astype(np.float64)
    weights = (len(y) / (len(names) * counts))[y]  # every class weighs the same in total
    for name, m in (examples or {}).items():
        if name in names and m.shape[0]:
            train.append(m)
            y = np.concatenate([y, np.full(m.shape[0], names.index(name))])
            weights = np.concatenate([weights, np.full(m.shape[0], float(example_weight))])
    with torch.no_grad():
        log_probs = torch.log_softmax(net.logits(torch.cat(hidden)).double() / net.temperature, dim=-1)
    return fit_lexical(sp.vstack(train).tocsr(), y, sp.vstack(calib).tocsr(), np.concatenate(calib_labels),
                       log_probs, len(names), weights=weights, settings=settings, seed=seed)
