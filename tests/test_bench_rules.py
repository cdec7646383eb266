"""The evidence benchmark's small rules: grids, equal-time budgets, schedule,
paired statistics (against hand computations), batch orders."""

import math

import numpy as np
import pytest

from benchmarks import grid, stats


def test_initial_grid_is_seven_values_two_apart():
  values = grid.initial(1e-3)
  assert len(values) == 7
  np.testing.assert_allclose(values[3], 1e-3)
  np.testing.assert_allclose(np.diff(np.log2(values)), 1.0)
  np.testing.assert_allclose(values[0], 1e-3 / 8)
  assert grid.initial(1.0, count=4, factor=10) == pytest.approx(
    [0.01, 0.1, 1, 10]
  )
  with pytest.raises(ValueError):
    grid.initial(0.0)


def test_choose_ignores_diverged_values_and_breaks_ties_low():
  scores = {0.1: [0.8, 0.82], 0.2: [0.85, math.nan], 0.4: [0.84, 0.84]}
  assert grid.choose(scores, higher_is_better=True) == 0.4
  assert grid.choose({1: [2.0], 2: [1.0]}, higher_is_better=False) == 2
  assert grid.choose({1: [1.0], 2: [1.0]}, higher_is_better=True) == 1
  assert grid.choose({1: [math.nan]}, higher_is_better=True) is None
  assert math.isnan(grid.mean_score([1.0, math.inf]))


def test_extension_only_at_an_end():
  up = {1: [0.1], 2: [0.2], 4: [0.3]}
  assert grid.extension(up, higher_is_better=True) == 8
  assert grid.extension(up, higher_is_better=False) == 0.5
  assert grid.extension({1: [0.1], 2: [0.3], 4: [0.2]}, True) is None
  assert grid.extension({1: [math.nan], 2: [math.nan]}, True) is None


def test_trained_range():
  trains = {1: [True, True], 2: [True, False], 0.5: [True, True], 4: []}
  assert grid.trained_range(trains) == (0.5, 1)
  assert grid.trained_range({1: [False]}) is None


def test_equal_time_steps():
  assert grid.equal_time_steps(1000, 1.0, 1.0) == 1000
  assert grid.equal_time_steps(1000, 1.0, 1.25) == 800  # slower: fewer
  assert grid.equal_time_steps(1000, 1.0, 0.8) == 1250  # faster: more
  assert grid.equal_time_steps(10, 1.0, 100.0) == 1
  with pytest.raises(ValueError):
    grid.equal_time_steps(10, 0.0, 1.0)


def test_paired_matches_a_hand_computation():
  a = [0.90, 0.88, 0.91, 0.89, 0.92]
  b = [0.88, 0.87, 0.88, 0.88, 0.90]
  # differences 0.02, 0.01, 0.03, 0.01, 0.02: mean 0.018, sample std
  # sqrt(0.00028 / 4) = 0.0083666, se 0.0037417, t(0.975, 4) = 2.776445
  result = stats.paired(a, b)
  assert result['n'] == 5
  assert result['mean'] == pytest.approx(0.018)
  assert result['std'] == pytest.approx(0.0083666, rel=1e-4)
  half = 2.776445 * 0.0083666 / math.sqrt(5)
  assert result['ci'] == pytest.approx([0.018 - half, 0.018 + half], rel=1e-4)
  # t = 0.018 / 0.0037417 = 4.8107; the t CDF with 4 degrees of freedom in
  # closed form: F(t) = 1/2 + 3/8 u (1 - t^2 / (12 (1 + t^2 / 4))),
  # u = t / sqrt(1 + t^2 / 4); two-sided p = 2 (1 - F(t)) = 0.0085809
  t = 0.018 / (0.0083666 / math.sqrt(5))
  u = t / math.sqrt(1 + t * t / 4)
  cdf = 0.5 + 3 / 8 * u * (1 - t * t / (12 * (1 + t * t / 4)))
  assert result['p'] == pytest.approx(2 * (1 - cdf), rel=1e-4)
  assert result['p'] == pytest.approx(0.0085809, rel=1e-4)


def test_paired_degenerate_cases():
  assert math.isnan(stats.paired([1.0, math.nan], [0.0, 0.0])['mean'])
  same = stats.paired([1.0, 2.0], [1.0, 2.0])
  assert same['mean'] == 0 and same['p'] == 1.0
  assert stats.paired([2.0], [1.0])['mean'] == 1.0


def test_holm_by_hand():
  # sorted 0.01, 0.02, 0.04 with m = 3: 0.03, 0.04, max(0.04, 0.04) = 0.04
  assert stats.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
  # monotone step-down and capped at 1
  assert stats.holm([0.5, 0.3]) == pytest.approx([0.6, 0.6])
  adjusted = stats.holm([0.01, math.nan, 0.5])
  assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1])


def test_verdicts_against_the_margin():
  def comparison(mean, low, high, p):
    return {'mean': mean, 'ci': [low, high], 'p': p, 'holm_p': p}

  margin = 0.003
  assert stats.verdict(comparison(0.01, 0.005, 0.015, 0.001), margin, True) == (
    'better'
  )
  assert stats.verdict(
    comparison(0.01, 0.005, 0.015, 0.001), margin, False
  ) == ('worse')
  assert stats.verdict(comparison(0.0, -0.002, 0.002, 0.9), margin, True) == (
    'equivalent'
  )
  # significant but smaller than the margin, interval past it
  assert stats.verdict(comparison(0.002, 0.001, 0.004, 0.01), margin, True) == (
    'inconclusive'
  )
  assert stats.verdict(comparison(0.01, -0.01, 0.03, 0.3), margin, True) == (
    'inconclusive'
  )
  # the mean beyond the margin but not the whole interval: not a verdict
  assert stats.verdict(
    comparison(0.005, 0.002, 0.008, 0.001), margin, True
  ) == ('inconclusive')
  assert stats.verdict(
    comparison(0.005, 0.004, 0.008, 0.001), margin, False
  ) == ('worse')
