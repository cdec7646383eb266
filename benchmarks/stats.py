"""Paired comparisons over seeds: differences, t-based confidence intervals,
Holm's correction, and the verdict against a declared margin.

Runs with the same seed share the initialisation and the batch order, so the
comparison of two arms is the one-sample t-test of their per-seed
differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
  """``a - b`` per seed: mean, sample std, n, the t-based ``level``
  confidence interval of the mean, and the two-sided p-value of "mean 0".

  Non-finite differences make every field but ``n`` NaN.
  """
  diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  n = len(diff)
  if n != len(b):
    raise ValueError('paired samples need the same length')
  nan = {
    'mean': math.nan,
    'std': math.nan,
    'n': n,
    'ci': [math.nan, math.nan],
    'p': math.nan,
  }
  if n < 2 or not np.all(np.isfinite(diff)):
    if n == 1 and np.all(np.isfinite(diff)):
      nan['mean'] = float(diff[0])
    return nan
  mean, std = float(diff.mean()), float(diff.std(ddof=1))
  if std == 0:
    p = 1.0 if mean == 0 else 0.0
    return {'mean': mean, 'std': 0.0, 'n': n, 'ci': [mean, mean], 'p': p}
  se = std / math.sqrt(n)
  half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * se
  p = float(2 * scipy_stats.t.sf(abs(mean) / se, n - 1))
  return {
    'mean': mean,
    'std': std,
    'n': n,
    'ci': [mean - half, mean + half],
    'p': p,
  }


def holm(pvalues: Sequence[float]) -> list[float]:
  """Holm-adjusted p-values (step-down; NaN stays NaN and is not counted)."""
  p = np.asarray(pvalues, np.float64)
  finite = np.flatnonzero(np.isfinite(p))
  adjusted = np.full(len(p), math.nan)
  m = len(finite)
  running = 0.0
  for rank, i in enumerate(finite[np.argsort(p[finite], kind='stable')]):
    running = max(running, min(1.0, (m - rank) * p[i]))
    adjusted[i] = running
  return [float(v) for v in adjusted]


def verdict(
  comparison: dict, margin: float, higher_is_better: bool, alpha: float = 0.05
) -> str:
  """``better``, ``worse``, ``equivalent`` or ``inconclusive`` for ``a``
  against ``b`` (``comparison`` from :func:`paired` with ``holm_p``).

  * better / worse: the Holm-adjusted p is below ``alpha`` and the whole
    confidence interval lies beyond the margin in ``a``'s favour / against
    it;
  * equivalent: the confidence interval lies within ``+-margin``;
  * inconclusive: anything else (including a significant difference
    whose interval reaches inside the margin).
  """
  mean, (low, high) = comparison['mean'], comparison['ci']
  p = comparison.get('holm_p', comparison['p'])
  if not all(math.isfinite(v) for v in (mean, low, high, p)):
    return 'inconclusive'
  gain_low, gain_high = (low, high) if higher_is_better else (-high, -low)
  if p < alpha and gain_low > margin:
    return 'better'
  if p < alpha and gain_high < -margin:
    return 'worse'
  if -margin <= low and high <= margin:
    return 'equivalent'
  return 'inconclusive'


def ratio(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
  """The ratio of paired positive measurements ``a / b`` (e.g. times taken
  in the same round): the geometric mean of the per-pair ratios and the
  t-based ``level`` confidence interval of it (on the log ratios; NaN with
  fewer than two pairs)."""
  logs = np.log(np.asarray(a, np.float64) / np.asarray(b, np.float64))
  if len(logs) < 2:
    value = float(np.exp(logs.mean())) if len(logs) else math.nan
    return {'ratio': value, 'ci': [math.nan, math.nan], 'n': len(logs)}
  mean = float(logs.mean())
  se = float(logs.std(ddof=1)) / math.sqrt(len(logs))
  half = float(scipy_stats.t.ppf(0.5 + level / 2, len(logs) - 1)) * se
  return {
    'ratio': math.exp(mean),
    'ci': [math.exp(mean - half), math.exp(mean + half)],
    'n': len(logs),
  }
