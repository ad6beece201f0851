"""Saying "no domain": the abstain threshold chosen on validation data (`tlora train --abstain auto`).

Below the threshold (calibrated confidence = the largest router probability) the router abstains
and the plain base model answers. Two rules choose it:

- with out-of-scope rows (texts no domain should answer: `tlora train --out-of-scope FILE`,
  `tlora examples add --domain none ...`): the threshold t that maximises in-scope accuracy (an
  abstained in-scope row counts as wrong) + out-of-scope recall (the share of out-of-scope rows
  abstained), over the candidates 0 and every observed confidence; ties go to the smallest t
  (abstain as little as the validation data allows);
- without them no recall can be measured: the largest t that still keeps (does not abstain on)
  `keep` (default 95%) of the in-scope validation rows the router got right.

`in_scope_and_oos` gives the pair intent-detection papers report (Larson et al. 2019, CLINC150):
in-scope accuracy and out-of-scope recall at a threshold.
"""

from __future__ import annotations

import math

import torch

from temporal_lora.errors import InputError

RULE_OOS = "in-scope + out-of-scope"


def keep_rule(keep: float) -> str:
    return f"keep {keep:.0%} of correct in-scope"


def _check(probs: torch.Tensor, labels: torch.Tensor, oos_probs: torch.Tensor | None) -> None:
    if probs.dim() != 2 or probs.shape[0] == 0:
        raise InputError(f"in-scope probabilities must be [n > 0, classes], got {list(probs.shape)}")
    if labels.dim() != 1 or labels.shape[0] != probs.shape[0]:
        raise InputError(f"{labels.shape[0] if labels.dim() else 0} labels for {probs.shape[0]} in-scope rows")
    if int(labels.min()) < 0 or int(labels.max()) >= probs.shape[1]:
        raise InputError(f"labels must be class indices in [0, {probs.shape[1]})")
    if oos_probs is not None and (oos_probs.dim() != 2 or oos_probs.shape[1] != probs.shape[1]):
        raise InputError(f"out-of-scope probabilities must be [m, {probs.shape[1]}], got {list(oos_probs.shape)}")


def _oos(oos_probs: torch.Tensor | None) -> torch.Tensor | None:
    return None if oos_probs is None or oos_probs.shape[0] == 0 else oos_probs


def in_scope_and_oos(probs: torch.Tensor, labels: torch.Tensor, oos_probs: torch.Tensor | None,
                     threshold: float) -> dict:
    """In-scope accuracy without abstention and at `threshold` (abstained rows count as wrong), the
    share of in-scope rows abstained, and out-of-scope recall at `threshold` (None without
    out-of-scope rows). `probs` [n, C] and `oos_probs` [m, C] are calibrated probabilities."""
    _check(probs, labels, oos_probs)
    oos_probs = _oos(oos_probs)
    conf, pred = probs.float().max(dim=1)
    correct = pred == labels.long()
    kept = conf >= threshold
    recall = None
    if oos_probs is not None:
        recall = float((oos_probs.float().max(dim=1).values < threshold).float().mean())
    return {"threshold": float(threshold),
            "in_scope_accuracy": float(correct.float().mean()),
            "in_scope_accuracy_at_threshold": float((correct & kept).float().mean()),
            "in_scope_abstained": float((~kept).float().mean()),
            "oos_recall": recall,
            "in_scope": int(probs.shape[0]), "out_of_scope": 0 if oos_probs is None else int(oos_probs.shape[0])}


def choose_threshold(probs: torch.Tensor, labels: torch.Tensor, oos_probs: torch.Tensor | None = None, *,
                     keep: float = 0.95) -> tuple[float, dict]:
    """The abstain threshold for calibrated in-scope probabilities `probs` [n, C] with true classes
    `labels` [n] and, optionally, out-of-scope rows `oos_probs` [m, C]; returns (threshold, report).
    The rules are the module's docstring's; the report holds the threshold, the rule, the
    validation numbers at it (`in_scope_and_oos`) and the counts."""
    if not 0.0 < keep <= 1.0:
        raise InputError(f"keep must be in (0, 1], got {keep}")
    _check(probs, labels, oos_probs)
    oos_probs = _oos(oos_probs)
    conf, pred = probs.float().max(dim=1)
    correct = pred == labels.long()
    if oos_probs is not None:
        threshold = _best_joint(conf, correct, oos_probs.float().max(dim=1).values)
        rule = RULE_OOS
    else:
        threshold = _keep_correct(conf[correct], keep)
        rule = keep_rule(keep)
    report = {"rule": rule, **in_scope_and_oos(probs, labels, oos_probs, threshold),
              "in_scope_correct": int(correct.sum())}
    if oos_probs is None:
        report["keep"] = keep
    return threshold, report


def _best_joint(conf: torch.Tensor, correct: torch.Tensor, oos_conf: torch.Tensor) -> float:
    """argmax over t of accuracy(t) + recall(t), ties to the smallest t; the score is compared as the
    integer m * correct_kept + n * oos_abstained, so that equal scores are exactly equal."""
    n, m = len(conf), len(oos_conf)
    best_t, best_score = 0.0, None
    for t in sorted({0.0, *conf.tolist(), *oos_conf.tolist()}):
        score = m * int((correct & (conf >= t)).sum()) + n * int((oos_conf < t).sum())
        if best_score is None or score > best_score:
            best_t, best_score = t, score
    return float(best_t)


def _keep_correct(correct_conf: torch.Tensor, keep: float) -> float:
    """The largest t with at least ceil(keep * k) of the k correct rows at confidence >= t (0 when
    the router got no row right: nothing to keep, nothing learned about where to cut)."""
    if len(correct_conf) == 0:
        return 0.0
    need = max(1, math.ceil(keep * len(correct_conf) - 1e-9))
    return float(correct_conf.sort(descending=True).values[need - 1])
