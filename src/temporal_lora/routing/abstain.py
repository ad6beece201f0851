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

import scipy.sparse as sp
import torch

from temporal_lora.errors import InputError
from temporal_lora.routing.lexical import hash_texts, joint_probs

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
    conf, pred = probs.double().max(dim=1)
    correct = pred == labels.long()
    kept = conf >= threshold
    recall = None
    if oos_probs is not None:
        recall = float((oos_probs.double().max(dim=1).values < threshold).float().mean())
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
    conf, pred = probs.double().max(dim=1)
    correct = pred == labels.long()
    if oos_probs is not None:
        threshold = _best_joint(conf, correct, oos_probs.double().max(dim=1).values)
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


# ------------------------------------------------------------------------------------------ from a router's memory
def replay_calibration(features: dict[str, dict[str, torch.Tensor]],
                       lengths: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-scope validation rows of a replay memory (routing/replay.py's layout) and their labels
    (the class's position in `features`): each class's "calib" rows at the longest prefix length
    (whole windows, as a full prompt is read) and its "short_calib" rows (short texts) where stored."""
    x, y = [], []
    for label, f in enumerate(features.values()):
        rows = _longest(f["calib"], lengths)
        if "short_calib" in f:
            rows = torch.cat([rows, f["short_calib"].float()])
        x.append(rows)
        y.append(torch.full((len(rows),), label, dtype=torch.long))
    return torch.cat(x), torch.cat(y)


def _longest(calib: torch.Tensor, lengths: list[int] | None) -> torch.Tensor:
    return calib[_longest_at(calib.shape[0], lengths)].float()


def _longest_at(n_lengths: int, lengths: list[int] | None) -> int:
    """The index of the longest prefix length (the last one where the lengths are not given)."""
    return lengths.index(max(lengths)) if lengths else n_lengths - 1


def lexical_calibration(rows: dict, features: dict[str, dict[str, torch.Tensor]], lengths: list[int] | None = None):
    """The hashed counts (routing/lexical.py's replay memory) of `replay_calibration`'s rows, same order:
    a class's "calib" counts are [L * m] rows flattened length by length."""
    out = []
    for name, f in features.items():
        n_len, m = f["calib"].shape[0], f["calib"].shape[1]
        at = _longest_at(n_len, lengths)
        calib = rows[name]["calib"]
        if calib.shape[0] != n_len * m:
            raise InputError(f"lexical rows of {name!r} ({calib.shape[0]}) do not match its router rows ({n_len * m})")
        out.append(calib[at * m:(at + 1) * m])
        if "short_calib" in f:
            out.append(rows[name]["short_calib"])
    return sp.vstack(out).tocsr()


def choose_from_replay(net, features: dict[str, dict[str, torch.Tensor]], lengths: list[int] | None,
                       oos_features: torch.Tensor | None = None, *, lexical=None, lexical_rows: dict | None = None,
                       oos_texts: list[str] | None = None, keep: float = 0.95) -> tuple[float, dict]:
    """`choose_threshold` for a fitted router: in-scope rows from its replay memory
    (`replay_calibration`), out-of-scope rows from pooled features [m, dim] (and, with a lexical
    head, their texts: the first max_tokens tokens of each, decoded). With a lexical head but no
    lexical replay memory the hidden-state head's probabilities are used, and the report says so."""
    x, y = replay_calibration(features, lengths)
    joint = lexical is not None and lexical_rows is not None
    if joint:
        probs = joint_probs(net, x, lexical, lexical_calibration(lexical_rows, features, lengths))
    else:
        probs = joint_probs(net, x)
    oos = None
    if oos_features is not None and len(oos_features):
        if joint and (oos_texts is None or len(oos_texts) != len(oos_features)):
            raise InputError("out-of-scope rows need their texts for the router's lexical head")
        oos = joint_probs(net, oos_features, lexical, hash_texts(oos_texts, lexical.settings)) if joint \
            else joint_probs(net, oos_features)
    threshold, report = choose_threshold(probs, y, oos, keep=keep)
    report["probabilities"] = "hidden-state + lexical heads" if joint else (
        "hidden-state head (no lexical replay memory)" if lexical is not None else "hidden-state head")
    if lengths:
        report["in_scope_rows"] = f"validation windows at {max(lengths)} tokens + short texts"
    return threshold, report
