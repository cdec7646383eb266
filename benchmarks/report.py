"""Outputs of the evidence benchmark: JSON, a Markdown report, plots.

:func:`analyse` turns the runs of one task into paired comparisons and the
curvature decision; :func:`markdown` writes them as tables; :func:`plot_task`
draws the validation curves (mean and seed band per arm) and the paired
differences with their confidence intervals.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import grid, stats

REFERENCES = ('adam', 'sgdm')


def _finals(runs: list[dict], metric: str) -> dict[int, float]:
  return {
    r['seed']: (r['test'] or {}).get(metric, math.nan)
    for r in runs
    if r['test']
  }


def _pairs(a: dict[int, float], b: dict[int, float]):
  seeds = sorted(set(a) & set(b))
  return [a[s] for s in seeds], [b[s] for s in seeds]


def analyse(task: dict[str, Any]) -> dict[str, Any]:
  """Comparisons of every arm with Adam and with SGD-momentum, at equal
  steps and at equal time (Holm over each view's comparisons), and the
  curvature decision (Holm over its two comparisons)."""
  metric, higher = task['metric'], task['higher_is_better']
  margin = task['margin']
  arms = task['arms']
  views = {}
  for view in ('equal_steps', 'equal_time'):
    finals = {}
    for name, entry in arms.items():
      runs = entry.get('eval') or []
      if view == 'equal_time' and entry.get('equal_time', {}).get('runs'):
        runs = entry['equal_time']['runs']
      if runs:
        finals[name] = _finals(runs, metric)
    rows = []
    for name in finals:
      for ref in REFERENCES:
        if ref == name or ref not in finals:
          continue
        a, b = _pairs(finals[name], finals[ref])
        rows.append({'arm': name, 'versus': ref, **stats.paired(a, b)})
    for row, p in zip(rows, stats.holm([r['p'] for r in rows])):
      row['holm_p'] = p
      row['verdict'] = stats.verdict(row, margin, higher)
    summary = {}
    for name, values in finals.items():
      v = np.asarray(list(values.values()), np.float64)
      summary[name] = {
        'mean': float(v.mean()) if len(v) else math.nan,
        'std': float(v.std(ddof=1)) if len(v) > 1 else math.nan,
        'n': len(v),
      }
    views[view] = {'summary': summary, 'comparisons': rows}
  controls = []
  for base, control in task.get('control_pairs', []):
    runs = [task['arms'].get(n, {}).get('eval') for n in (base, control)]
    if all(runs):
      a, b = _pairs(_finals(runs[0], metric), _finals(runs[1], metric))
      controls.append({'arm': base, 'versus': control, **stats.paired(a, b)})
  return {'views': views, 'decision': decision(task), 'controls': controls}


def decision(task: dict[str, Any]) -> dict[str, Any] | None:
  """The pre-declared rule: the best finite relative damping ``a*`` (seeds
  0-2) helps only if it beats both ``a = inf`` and the permuted control at
  ``a*`` on the evaluation seeds, each Holm-adjusted interval excluding 0."""
  rule = task.get('decision_arms')
  if not rule:
    return None
  best, others = rule['best'], [rule['inf'], rule['permuted']]
  arms, metric = task['arms'], task['metric']
  if any(
    name not in arms or not arms[name].get('eval') for name in [best, *others]
  ):
    return None
  rows = []
  for other in others:
    a, b = _pairs(
      _finals(arms[best]['eval'], metric), _finals(arms[other]['eval'], metric)
    )
    rows.append({'arm': best, 'versus': other, **stats.paired(a, b)})
  adjusted = stats.holm([r['p'] for r in rows])
  order = sorted(range(len(rows)), key=lambda i: (rows[i]['p'], i))
  for rank, i in enumerate(order):
    row = rows[i]
    row['holm_p'] = adjusted[i]
    # Holm's step-down level of this comparison: 0.05 / (m - rank)
    row['holm_level'] = 1 - 0.05 / (len(rows) - rank)
    a, b = _pairs(
      _finals(arms[best]['eval'], metric),
      _finals(arms[row['versus']]['eval'], metric),
    )
    row['holm_ci'] = stats.paired(a, b, level=row['holm_level'])['ci']
  for row in rows:
    gain = row['mean'] if task['higher_is_better'] else -row['mean']
    row['beats'] = bool(row['holm_p'] < 0.05 and gain > 0)
  helps = all(r['beats'] for r in rows)
  return {
    'best': best,
    'a_star': rule['a_star'],
    'comparisons': rows,
    'curvature_helps': helps,
    'rule': rule['text'],
  }


def _fmt(value: float, digits: int = 4) -> str:
  return 'nan' if not math.isfinite(value) else f'{value:.{digits}f}'


def _signed(value: float, digits: int) -> str:
  return 'nan' if not math.isfinite(value) else f'{value:+.{digits}f}'


def _p(value: float) -> str:
  if not math.isfinite(value):
    return 'nan'
  return f'{value:.2g}' if value >= 1e-3 else f'{value:.0e}'


def _lr(value) -> str:
  return 'adaptive' if value is None else f'{value:.3g}'


def trained_range_text(entry: dict) -> str:
  tuning = entry.get('grid')
  if not tuning:
    return '-'
  trains = {}
  for run in tuning['runs']:
    trains.setdefault(run['learning_rate'], []).append(run['trains'])
  found = grid.trained_range(trains)
  tried = sorted(trains)
  if found is None:
    return f'none of {_lr(tried[0])}-{_lr(tried[-1])}'
  inside = [v for v in tried if found[0] <= v <= found[1]]
  gaps = [v for v in inside if not all(trains[v])]
  text = f'{_lr(found[0])}-{_lr(found[1])}'
  if gaps:
    text += f' (not {", ".join(_lr(v) for v in gaps)})'
  return text


def comparison_cell(row: dict | None, digits: int) -> str:
  if row is None:
    return '-'
  low, high = row['ci']
  return (
    f'{_signed(row["mean"], digits)} [{_signed(low, digits)}, '
    f'{_signed(high, digits)}] p={_p(row["holm_p"])} {row["verdict"]}'
  )


def task_markdown(name: str, task: dict, analysis: dict) -> list[str]:
  scale = 100 if task['metric'] == 'accuracy' else 1
  unit = ' (%)' if scale == 100 else ' (nats/char)'
  digits = 2 if scale == 100 else 4
  lines = [f'## {name}', '', task['description'], '']
  sha = task['info'].get('sha256', {})
  if sha:
    lines += [
      'SHA-256: ' + ', '.join(f'{k} `{v[:16]}`' for k, v in sha.items()),
      '',
    ]
  timing = task.get('timing')
  if timing:
    lines += [
      f'Step-time ratios to Adam (interleaved rounds, {timing["rounds"]} x '
      f'{timing["steps_per_round"]} steps, one run, this machine): '
      + ', '.join(
        f'{arm} {ratio:.3f}' for arm, ratio in timing['ratio'].items()
      ),
      '',
    ]
  metric_label = f'test {task["metric"]}{unit}'
  for view, title in (
    ('equal_steps', f'Equal steps ({task["steps"]} steps)'),
    ('equal_time', "Equal time (Adam's time for its steps)"),
  ):
    data = analysis['views'][view]
    rows = {(r['arm'], r['versus']): r for r in data['comparisons']}
    lines += [
      f'### {title}',
      '',
      f'Paired differences (arm - reference) of the {metric_label} over '
      f'seeds {task["eval_seeds"][0]}-{task["eval_seeds"][-1]}, 95% CI, '
      'Holm-adjusted p over the table, verdict against the margin '
      f'{task["margin"] * scale:g}:',
      '',
      f'| arm | lr | steps | {metric_label} | vs Adam | vs SGD-m |',
      '|---|---:|---:|---:|---|---|',
    ]
    for arm, summary in data['summary'].items():
      entry = task['arms'][arm]
      steps = task['steps']
      if view == 'equal_time' and entry.get('equal_time', {}).get('runs'):
        steps = entry['equal_time']['steps']
      scaled = {
        k: v * scale if k != 'n' else v
        for k, v in summary.items()
        if k in ('mean', 'std')
      }
      cells = []
      for ref in REFERENCES:
        row = rows.get((arm, ref))
        if row is not None:
          row = {
            **row,
            'mean': row['mean'] * scale,
            'ci': [c * scale for c in row['ci']],
          }
        cells.append(comparison_cell(row, digits))
      lines.append(
        f'| {arm} | {_lr(entry.get("chosen"))} | {steps} | '
        f'{_fmt(scaled["mean"], digits)} ± {_fmt(scaled["std"], digits)} | '
        f'{cells[0]} | {cells[1]} |'
      )
    lines.append('')
  verdict = analysis.get('decision')
  if verdict:
    lines += [
      '### Does the curvature help? (decision rule)',
      '',
      verdict['rule'],
      '',
      f'a* = {verdict["a_star"]:g} (arm `{verdict["best"]}`, chosen on the '
      'tuning seeds).',
      '',
      '| comparison | difference (mean, 95% CI) | Holm p | Holm-level CI | '
      'beats |',
      '|---|---|---:|---|---|',
    ]
    for row in verdict['comparisons']:
      lines.append(
        f'| {row["arm"]} vs {row["versus"]} | '
        f'{_signed(row["mean"] * scale, digits)} '
        f'[{_signed(row["ci"][0] * scale, digits)}, '
        f'{_signed(row["ci"][1] * scale, digits)}] | {_p(row["holm_p"])} | '
        f'[{_signed(row["holm_ci"][0] * scale, digits)}, '
        f'{_signed(row["holm_ci"][1] * scale, digits)}] | '
        f'{"yes" if row["beats"] else "no"} |'
      )
    lines += [
      '',
      f'**Verdict ({name}): the curvature '
      f'{"helps" if verdict["curvature_helps"] else "does not help"}** by the '
      'rule above.',
      '',
    ]
  for row in analysis.get('controls', []):
    lines += [
      f'Control of the absolute damping: {row["arm"]} - {row["versus"]} = '
      f'{_signed(row["mean"] * scale, digits)} '
      f'[{_signed(row["ci"][0] * scale, digits)}, '
      f'{_signed(row["ci"][1] * scale, digits)}] (95% CI, p={_p(row["p"])}, '
      'equal steps; the layer mean keeps the per-layer step size and drops '
      "F~'s shape).",
      '',
    ]
  lines += [
    '### Learning rates',
    '',
    'Tuning: every value on seeds '
    f'{task["tune_seeds"][0]}-{task["tune_seeds"][-1]}, validation '
    f'{task["metric"]} (mean over seeds; a value with a non-finite run is '
    'out). "Trains": every tuning seed finite and past the threshold '
    f'({task["trains_threshold"]:g} validation {task["metric"]}).',
    '',
    '| arm | chosen | range that trains | tried: validation metric |',
    '|---|---:|---|---|',
  ]
  for arm, entry in task['arms'].items():
    tuning = entry.get('grid')
    if not tuning:
      lines.append(f'| {arm} | {_lr(entry.get("chosen"))} | - | (not tuned) |')
      continue
    by_lr = {}
    for run in tuning['runs']:
      by_lr.setdefault(run['learning_rate'], []).append(
        run['validation'][task['metric']]
      )
    tried = ', '.join(
      ('**' if lr == entry['chosen'] else '')
      + f'{_lr(lr)}: {_fmt(grid.mean_score(v) * scale, digits)}'
      + ('**' if lr == entry['chosen'] else '')
      for lr, v in sorted(by_lr.items())
    )
    lines.append(
      f'| {arm} | {_lr(entry["chosen"])} | {trained_range_text(entry)} | '
      f'{tried} |'
    )
  lines.append('')
  for plot in task.get('plots', []):
    lines += [f'![{name}]({plot})', '']
  return lines


def markdown(report: dict) -> str:
  lines = [
    f"# Evidence: does AdaFisher's curvature help? ({report['tier']})",
    '',
    f'* Date: {report["date"]}',
    f'* Machine: {report["machine_line"]}',
    f'* Command: `{report["command"]}`',
    f'* Wall time: {report.get("wall_seconds", math.nan) / 60:.1f} min',
  ]
  if report.get('rendered'):
    lines.append(
      f'* Report re-rendered from the JSON (same runs): {report["rendered"]}'
    )
  if report.get('resumed_from'):
    resumed = {
      name: task.get('resumed_tuning', [])
      for name, task in report['tasks'].items()
    }
    before = report.get('resumed_wall_seconds')
    lines.append(
      '* Resumed: the learning-rate tuning of these arms was read from an '
      f'interrupted run of the same tier (`{report["resumed_from"]}`'
      + (f', {before / 60:.1f} min more' if before else '')
      + '); '
      'timing and evaluation ran again: '
      + '; '.join(f'{n}: {", ".join(a) or "none"}' for n, a in resumed.items())
    )
  lines += [
    '',
  ]
  if report.get('summary_plot'):
    lines += [
      'Paired differences of the test metric at equal steps, both tasks '
      '(details, equal time and the curves below):',
      '',
      f'![summary]({report["summary_plot"]})',
      '',
    ]
  lines += [report['protocol_text'], '']
  for name, task in report['tasks'].items():
    if 'analysis' in task:
      lines += task_markdown(name, task, task['analysis'])
  if report.get('notes'):
    lines += ['## Notes (written after the run)', '']
    lines += [f'* {n}' for n in report['notes']] + ['']
  if report.get('skipped'):
    lines += ['## Skipped', ''] + [f'* {s}' for s in report['skipped']] + ['']
  return '\n'.join(lines)


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
  saved = {k: v for k, v in report.items() if k != 'resume'}
  partial.write_text(json.dumps(_strict(saved), indent=1) + '\n')
  partial.replace(path)


def _pyplot():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def plot_task(name: str, task: dict, analysis: dict, out: Path, suffix: str):
  """Two figures: validation curves with seed bands, paired differences."""
  plt = _pyplot()
  metric = task['metric']
  scale = 100 if metric == 'accuracy' else 1
  groups = task['plot_groups']
  fig, axes = plt.subplots(
    1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False
  )
  finals = []
  for ax, (title, names) in zip(axes[0], groups.items()):
    for arm in names:
      runs = task['arms'].get(arm, {}).get('eval')
      if not runs:
        continue
      steps = [p['step'] for p in runs[0]['curve']]
      values = np.array(
        [
          [float(p[metric]) * scale for p in r['curve']] for r in runs
        ]  # 'nan' too
      )
      mean = values.mean(0)
      (line,) = ax.plot(steps, mean, label=arm, lw=1.4)
      ax.fill_between(
        steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2
      )
      if all(r['trains'] for r in runs):
        finals.append(mean[-1])
    ax.set(
      xlabel='step',
      ylabel=f'validation {metric}' + (' (%)' if scale == 100 else ''),
      title=f'{name}: {title}',
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  if finals:  # zoom on the runs that trained
    low, high = min(finals), max(finals)
    for ax in axes[0]:
      if metric == 'accuracy':
        ax.set_ylim(low - 4, high + 1)
      else:
        ax.set_ylim(low - 0.05, high + 0.6)
  fig.suptitle(
    f'{name}: mean over seeds {task["eval_seeds"][0]}-'
    f'{task["eval_seeds"][-1]}, band = min-max over seeds (equal steps)'
  )
  fig.tight_layout()
  files = [f'evidence_{name}_curves{suffix}.png']
  fig.savefig(out / files[0], dpi=110)
  plt.close(fig)
  files.append(f'evidence_{name}_differences{suffix}.png')
  plot_differences({name: (task, analysis)}, out / files[1])
  return files


def plot_differences(
  tasks: dict[str, tuple[dict, dict]],
  path: Path,
  views: tuple[str, ...] = ('equal_steps', 'equal_time'),
) -> None:
  """Forest plots: per arm, the paired difference of the test metric
  against Adam (blue) and SGD-momentum (orange) with its 95% CI; one panel
  per task and view; dotted lines at +-margin; values off the axis are
  drawn at its edge with their number."""
  plt = _pyplot()
  fig, axes = plt.subplots(
    len(tasks),
    len(views),
    figsize=(6 * len(views), 0.32 * 17 * len(tasks) + 1),
    squeeze=False,
  )
  for row, (name, (task, analysis)) in enumerate(tasks.items()):
    scale = 100 if task['metric'] == 'accuracy' else 1
    margin = task['margin'] * scale
    for col, view in enumerate(views):
      ax = axes[row, col]
      comparisons = analysis['views'][view]['comparisons']
      arms = list(dict.fromkeys(r['arm'] for r in comparisons))
      spans = [
        abs(c) * scale
        for r in comparisons
        for c in r['ci']
        if math.isfinite(c) and abs(c) * scale < 20 * margin
      ]
      limit = max([3 * margin, *spans]) * 1.1
      for r in comparisons:
        y = arms.index(r['arm']) + (-0.15 if r['versus'] == 'adam' else 0.15)
        color = 'C0' if r['versus'] == 'adam' else 'C1'
        mean = r['mean'] * scale
        low, high = (c * scale for c in r['ci'])
        if not math.isfinite(mean):
          continue
        if abs(mean) > limit:
          edge = math.copysign(limit, mean)
          ax.plot(edge, y, '<' if mean < 0 else '>', color=color)
          ax.annotate(
            f'{mean:+.1f}',
            (edge, y),
            fontsize=6,
            ha='left' if mean < 0 else 'right',
            va='center',
            xytext=(6 if mean < 0 else -6, 0),
            textcoords='offset points',
          )
          continue
        ax.errorbar(
          mean,
          y,
          xerr=[[mean - max(low, -limit)], [min(high, limit) - mean]],
          fmt='o',
          color=color,
          ms=3,
          capsize=2,
        )
      for x in (-margin, margin):
        ax.axvline(x, color='grey', ls=':', lw=1)
      ax.axvline(0, color='black', lw=0.8)
      ax.set_xlim(-limit, limit)
      ax.set_yticks(range(len(arms)), arms, fontsize=7)
      ax.invert_yaxis()
      better = 'right' if task['higher_is_better'] else 'left'
      unit = 'points' if scale == 100 else 'nats/char'
      ax.set_xlabel(
        f'test {task["metric"]} difference ({unit}); better: {better}',
        fontsize=8,
      )
      ax.set_title(
        f'{name}, {view.replace("_", " ")}: vs Adam (blue), vs SGD-m '
        '(orange), 95% CI',
        fontsize=8,
      )
      ax.grid(alpha=0.3, axis='x')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
