"""Scores for NIAH predictions.

- ``string_match_all`` (RULER's NIAH metric, the default): per sample, the share of expected
  answers that occur in the prediction as case-insensitive substrings; mean over samples x 100,
  rounded to 2 decimals.
- ``string_match_part`` (RULER's QA metric): 1 if any expected answer occurs, else 0; mean x 100.
- ``comma_set_overlap`` (RAT+'s SFT scoring, an option): the prediction is split on commas and
  stripped; per sample, the number of expected answers among those pieces (exact, case-sensitive
  set overlap) over the number of expected answers; mean x 100, rounded to 2 decimals.

``score`` applies RULER's prediction clean-up first (strip; control characters -> newline).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(pred: str) -> str:
    """RULER's clean-up of a raw prediction before scoring."""
    return _CONTROL.sub("\n", pred.strip()).strip()


def _check(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if isinstance(preds, str):
        raise TypeError("preds must be a list of strings, not a string")
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} reference lists")
    if not preds:
        raise ValueError("nothing to score: no predictions")
    for r in refs:
        if isinstance(r, str) or not len(r):
            raise ValueError("each reference must be a non-empty list of answer strings")


def sample_match_all(pred: str, ref: Sequence[str]) -> float:
    p = pred.lower()
    return sum(1.0 for r in ref if r.lower() in p) / len(ref)


def sample_match_part(pred: str, ref: Sequence[str]) -> float:
    p = pred.lower()
    return 1.0 if any(r.lower() in p for r in ref) else 0.0


def sample_comma_set_overlap(pred: str, ref: Sequence[str]) -> float:
    got = {x.strip() for x in pred.split(",")}
    want = {x.strip() for x in ref}
    return len(got & want) / len(want)


def _mean100(fn, preds, refs) -> float:
    _check(preds, refs)
    return round(100.0 * sum(fn(p, r) for p, r in zip(preds, refs)) / len(preds), 2)


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    return _mean100(sample_match_all, preds, refs)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    return _mean100(sample_match_part, preds, refs)


def comma_set_overlap(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    return _mean100(sample_comma_set_overlap, preds, refs)


METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "comma_set_overlap": comma_set_overlap,
}
SAMPLE_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": sample_match_all,
    "string_match_part": sample_match_part,
    "comma_set_overlap": sample_comma_set_overlap,
}


def score(preds: Sequence[str], refs: Sequence[Sequence[str]], metric: str = "string_match_all") -> float:
    """Clean predictions as RULER's evaluator does, then apply ``metric`` (0..100)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return METRICS[metric]([postprocess_pred(p) for p in preds], refs)
