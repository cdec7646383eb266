"""Outputs of the evidence benchmark: analysis, JSON helpers, Markdown.

:func:`analyse` turns the runs of one task into paired comparisons (every
arm against Adam and against the best peer, at equal steps and at equal
time), the controls and the learning-rate sensitivity; :func:`recommend`
applies the selection rule across tasks; :func:`write_report` writes
``report.md`` and the plots (:mod:`benchmarks.plots`) from the JSON files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import grid, protocol, stats

VIEWS = ('equal_steps', 'equal_time')

# ------------------------------------------------------------------- JSON


def _strict(value):
  """JSON without NaN/Infinity (as strings)."""
  if isinstance(value, float) and not math.isfinite(value):
    return repr(value)
  if isinstance(value, dict):
    return {str(k): _strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_strict(v) for v in value]
  return value


def loose(value):
  """The inverse of :func:`_strict`: ``'nan'``, ``'inf'`` and ``'-inf'``
  strings back to floats (for JSON read back)."""
  if isinstance(value, str) and value in ('nan', 'inf', '-inf'):
    return float(value)
  if isinstance(value, dict):
    return {k: loose(v) for k, v in value.items()}
  if isinstance(value, list):
    return [loose(v) for v in value]
  return value


def plain(value):
  """``value`` as it reads back from the JSON."""
  return json.loads(json.dumps(_strict(value)))


def write_json(report: dict, path: Path) -> None:
  partial = path.with_suffix('.tmp')
  partial.write_text(json.dumps(_strict(report), indent=1) + '\n')
  partial.replace(path)


def load_tasks(out: Path) -> dict[str, dict]:
  """Every task's JSON in ``out``, in the protocol's order."""
  order = ['mlp', 'cnn', 'autoencoder', 'gpt']
  found = {}
  for name in order:  # pilot_*.json, batch_size.json, replications: not tasks
    path = out / f'{name}.json'
    if path.exists():
      found[name] = loose(json.loads(path.read_text()))
  return found


# --------------------------------------------------------------- analysis


def finals(runs: list[dict], metric: str) -> dict[int, float]:
  return {r['seed']: (r['test'] or {}).get(metric, math.nan) for r in runs}


def _pairs(a: dict[int, float], b: dict[int, float]):
  seeds = sorted(set(a) & set(b))
  return [a[s] for s in seeds], [b[s] for s in seeds]


def view_finals(task: dict, view: str) -> dict[str, dict[int, float]]:
  """Per arm, the test metric per evaluation seed in ``view`` (equal time:
  the equal-time runs where they exist; arms whose time ratio is
  inconclusive are left out)."""
  out = {}
  for name, entry in task['arms'].items():
    runs = entry.get('eval') or []
    timing = entry.get('equal_time') or {}
    if view == 'equal_time':
      if timing.get('plan') == 'inconclusive':
        continue
      runs = timing.get('runs') or runs
    if runs:
      out[name] = finals(runs, task['metric'])
  return out


def _summary(values: dict[int, float]) -> dict[str, float]:
  v = np.asarray(list(values.values()), np.float64)
  return {
    'mean': float(v.mean()) if len(v) else math.nan,
    'std': float(v.std(ddof=1)) if len(v) > 1 else math.nan,
    'n': len(v),
  }


def compare(task, values, pairs) -> list[dict]:
  """Paired comparisons ``(arm, reference)`` with Holm over the list and
  the verdict of :data:`benchmarks.protocol.VERDICT_RULE`."""
  rows = []
  for arm, ref in pairs:
    a, b = _pairs(values[arm], values[ref])
    rows.append({'arm': arm, 'versus': ref, **stats.paired(a, b)})
  for row, p in zip(rows, stats.holm([r['p'] for r in rows])):
    row['holm_p'] = p
    row['verdict'] = stats.verdict(
      row, task['margin'], task['higher_is_better']
    )
  return rows


def references(task: dict) -> list[str]:
  peer = task.get('best_peer')
  return ['adam'] + ([peer] if peer and peer != 'adam' else [])


def analyse(task: dict[str, Any]) -> dict[str, Any]:
  """Comparisons with Adam and with the best peer in both views (Holm over
  each view), the controls (their own Holm), the time-ratio plans, the
  learning-rate sensitivity."""
  views = {}
  for view in VIEWS:
    values = view_finals(task, view)
    pairs = [
      (arm, ref)
      for arm in values
      for ref in references(task)
      if ref in values and ref != arm
    ]
    views[view] = {
      'summary': {n: _summary(v) for n, v in values.items()},
      'comparisons': compare(task, values, pairs),
    }
  return {
    'views': views,
    'controls': controls(task),
    'sensitivity': {
      n: sensitivity(task, e) for n, e in task['arms'].items() if e.get('grid')
    },
    'inconclusive_timing': [
      n
      for n, e in task['arms'].items()
      if (e.get('equal_time') or {}).get('plan') == 'inconclusive'
    ],
  }


def controls(task: dict) -> list[dict]:
  """The best candidate against its permuted factors and against
  Adafactor (equal steps, Holm over the two)."""
  best = task.get('best_candidate')
  values = view_finals(task, 'equal_steps')
  pairs = [
    (best, other)
    for other in (f'{best}+perm', 'adafactor')
    if best in values and other in values
  ]
  return compare(task, values, pairs)


def sensitivity(task: dict, entry: dict) -> dict[str, Any]:
  """The learning rates whose mean tuning score is within
  :data:`protocol.SENSITIVITY` (relative) of the arm's best (at the decay
  of its learning-rate sweep)."""
  tried = entry['grid'].get('decays_tried')
  decay = tried[1] if tried else None  # the learning-rate sweep's decay
  by_lr = {}
  for run in entry['grid']['runs']:
    if run.get('weight_decay') == decay:
      by_lr.setdefault(run['learning_rate'], []).append(
        run['validation'][task['metric']]
      )
  scores = {lr: grid.mean_score(v) for lr, v in sorted(by_lr.items())}
  finite = {lr: s for lr, s in scores.items() if math.isfinite(s)}
  if not finite:
    return {'scores': scores, 'range': None, 'factor': math.nan}
  higher = task['higher_is_better']
  best = max(finite.values()) if higher else min(finite.values())
  tol = protocol.SENSITIVITY * abs(best)
  close = [
    lr
    for lr, s in finite.items()
    if (s >= best - tol if higher else s <= best + tol)
  ]
  return {
    'scores': scores,
    'best': best,
    'range': [min(close), max(close)],
    'factor': max(close) / min(close),
  }


# --------------------------------------------------------- recommendation


def recommend(tasks: dict[str, dict]) -> dict[str, Any]:
  """The selection rule (:data:`protocol.SELECTION_RULE`) over the tasks
  with tuning results."""
  names = [c.name for c in protocol.CANDIDATES]
  deficits: dict[str, dict[str, float]] = {n: {} for n in names}
  used = []
  for task_name, task in tasks.items():
    arms = task['arms']
    present = [n for n in names if arms.get(n, {}).get('grid')]
    if not arms.get('adam', {}).get('grid') or not present:
      continue
    used.append(task_name)
    adam = arms['adam']['grid']['score']
    for n in names:  # a candidate not run on a used task is out
      score = arms[n]['grid']['score'] if n in present else math.nan
      deficits[n][task_name] = protocol.deficit(
        score, adam, task['margin'], task['higher_is_better']
      )
  means = {
    n: (float(np.mean(list(d.values()))) if d else math.inf)
    for n, d in deficits.items()
  }
  best = None
  for n in names:  # ties within 0.1 go to the earlier candidate
    if best is None or means[n] < means[best] - 0.1:
      best = n
  return {'name': best, 'tasks': used, 'deficits': deficits, 'means': means}


# --------------------------------------------------------------- report


def write_report(out: Path, tier_name: str) -> Path:
  """``report.md`` and the plots from the JSON files in ``out``."""
  from benchmarks import plots, report_text

  tasks = load_tasks(out)
  for task in tasks.values():
    task['analysis'] = analyse(task)
  recommendation = recommend(tasks)
  batch_path = out / 'batch_size.json'
  batch = (
    loose(json.loads(batch_path.read_text())) if batch_path.exists() else None
  )
  figures = plots.all_plots(tasks, batch, out)
  text = report_text.markdown(tier_name, tasks, recommendation, batch, figures)
  path = out / 'report.md'
  path.write_text(text)
  summary = report_text.readme_summary(tier_name, tasks, recommendation)
  (out / 'README_results.md').write_text(summary)
  print(f'wrote {path} and {out / "README_results.md"}')
  return path
