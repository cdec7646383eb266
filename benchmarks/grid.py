"""Learning-rate grids and equal-time budgets (small, unit-tested rules).

* :func:`initial` gives ``count`` values ``factor`` apart around a centre.
* :func:`choose` picks the best value by the mean over tuning seeds of the
  validation metric (a value with any non-finite run never wins).
* :func:`extension` says which value to add when the best one lies at an
  end of the values tried so far (one value ``factor`` beyond that end).
* :func:`equal_time_steps` is an arm's step budget at Adam's time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def initial(center: float, count: int = 7, factor: float = 2.0) -> list[float]:
  """``count`` values ``factor`` apart, ``center`` in the middle (odd
  ``count``) or just above it (even)."""
  if count < 1 or factor <= 1 or not center > 0:
    raise ValueError('need count >= 1, factor > 1 and center > 0')
  low = -(count // 2)
  return [center * factor ** (low + k) for k in range(count)]


def mean_score(scores: Sequence[float]) -> float:
  """The mean over seeds, NaN if any seed is not finite (it diverged)."""
  if not scores or any(not math.isfinite(s) for s in scores):
    return math.nan
  return sum(scores) / len(scores)


def choose(
  scores: dict[float, Sequence[float]], higher_is_better: bool
) -> float | None:
  """The value with the best mean score (ties: the smaller value); ``None``
  when every value has a non-finite run."""
  best = None
  for value in sorted(scores):
    score = mean_score(scores[value])
    if not math.isfinite(score):
      continue
    if best is None or (
      (score > best[1]) if higher_is_better else (score < best[1])
    ):
      best = (value, score)
  return None if best is None else best[0]


def extension(
  scores: dict[float, Sequence[float]],
  higher_is_better: bool,
  factor: float = 2.0,
) -> float | None:
  """The value to add when the best value is at an end of those tried: one
  step of ``factor`` beyond that end; ``None`` when the best value is
  inside (or nothing trained)."""
  best = choose(scores, higher_is_better)
  values = sorted(scores)
  if best is None or len(values) < 2:
    return None
  if best == values[0]:
    return values[0] / factor
  if best == values[-1]:
    return values[-1] * factor
  return None


def trained_range(
  trains: dict[float, Sequence[bool]],
) -> tuple[float, float] | None:
  """The smallest and largest value whose runs all trained (``None``: none)."""
  ok = [v for v, flags in trains.items() if flags and all(flags)]
  return (min(ok), max(ok)) if ok else None


def equal_time_steps(steps: int, reference_time: float, arm_time: float) -> int:
  """An arm's steps in the time the reference takes for ``steps`` steps:
  ``round(steps * reference_time / arm_time)``, at least 1."""
  if not (reference_time > 0 and arm_time > 0):
    raise ValueError('step times must be positive')
  return max(1, round(steps * reference_time / arm_time))
