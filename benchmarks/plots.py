"""The evidence benchmark's figures (matplotlib, Agg): validation curves with
seed bands, paired-difference forest plots, learning-rate sensitivity and
batch size. Each function writes one PNG and returns its file name."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from benchmarks import protocol


def _pyplot():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def _scale(task) -> tuple[float, str]:
  if task['metric'] == 'accuracy':
    return 100.0, 'accuracy (%)'
  unit = 'nats/char' if task['task'] == 'gpt' else 'nats/image'
  return 1.0, f'loss ({unit})'


def groups(task: dict) -> dict[str, list[str]]:
  arms = task['arms']
  peers = [a.name for a in protocol.PEERS] + ['kfac']
  authors = [a.name for a in protocol.ADAFISHERS]
  drop_in = [c.name for c in protocol.CANDIDATES]
  drop_in += [n for n in arms if n.endswith('+perm')]
  return {
    'peers': [n for n in peers if n in arms],
    "AdaFisher, authors' numerics and relative damping": ['adam']
    + [n for n in authors if n in arms],
    'drop-in candidates and control': ['adam']
    + [n for n in drop_in if n in arms],
  }


def curves(name: str, task: dict, out: Path) -> str:
  """Validation curves: the mean over evaluation seeds, min-max band."""
  plt = _pyplot()
  scale, label = _scale(task)
  panels = groups(task)
  fig, axes = plt.subplots(
    1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False
  )
  finals = []
  for ax, (title, names) in zip(axes[0], panels.items()):
    for arm in names:
      runs = task['arms'][arm].get('eval')
      if not runs:
        continue
      steps = [p['step'] for p in runs[0]['curve']]
      values = np.array(
        [[float(p[task['metric']]) * scale for p in r['curve']] for r in runs]
      )
      (line,) = ax.plot(steps, values.mean(0), label=arm, lw=1.3)
      ax.fill_between(
        steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2
      )
      if np.all(np.isfinite(values[:, -1])):
        finals.append(values[:, -1].mean())
    ax.set(xlabel='step', ylabel=f'validation {label}', title=title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  _zoom(axes[0], finals, task['higher_is_better'])
  fig.suptitle(
    f'{name}: mean over the {len(task["eval_seeds"])} evaluation seeds, '
    'band = min-max (equal steps)'
  )
  fig.tight_layout()
  path = f'{name}_curves.png'
  fig.savefig(out / path, dpi=100)
  plt.close(fig)
  return path


def _zoom(axes, finals, higher: bool) -> None:
  if not finals:
    return
  low, high = min(finals), max(finals)
  span = max(high - low, 1e-9)
  for ax in axes:
    if higher:
      ax.set_ylim(low - 2 * span - 1, high + 0.3 * span + 0.5)
    else:
      ax.set_ylim(low - 0.3 * span - 0.01 * abs(low), high + 2 * span)


def forest(name: str, task: dict, out: Path) -> str:
  """Paired differences with 95% CIs against Adam and the best peer, both
  views; dotted lines at +-margin."""
  plt = _pyplot()
  scale, label = _scale(task)
  analysis = task['analysis']
  fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(task['arms']) + 2))
  margin = task['margin'] * scale
  for ax, view in zip(axes, ('equal_steps', 'equal_time')):
    rows = analysis['views'][view]['comparisons']
    arms = list(dict.fromkeys(r['arm'] for r in rows))
    refs = list(dict.fromkeys(r['versus'] for r in rows))
    for r in rows:
      y = arms.index(r['arm']) + 0.2 * (refs.index(r['versus']) - 0.5)
      mean = r['mean'] * scale
      if not math.isfinite(mean):
        continue
      low, high = (c * scale for c in r['ci'])
      ax.errorbar(
        mean,
        y,
        xerr=[[mean - low], [high - mean]],
        fmt='o',
        ms=3,
        capsize=2,
        color=f'C{refs.index(r["versus"])}',
      )
    for x in (-margin, margin):
      ax.axvline(x, color='grey', ls=':', lw=1)
    ax.axvline(0, color='black', lw=0.8)
    ax.set_yticks(range(len(arms)), arms, fontsize=7)
    ax.invert_yaxis()
    better = 'right' if task['higher_is_better'] else 'left'
    ax.set_xlabel(f'test {label} difference; better: {better}', fontsize=8)
    ax.set_title(
      f'{name}, {view.replace("_", " ")}: vs '
      + ', '.join(f'{ref} (C{i})' for i, ref in enumerate(refs)),
      fontsize=8,
    )
    ax.grid(alpha=0.3, axis='x')
  fig.tight_layout()
  path = f'{name}_differences.png'
  fig.savefig(out / path, dpi=100)
  plt.close(fig)
  return path


def lr_sensitivity(name: str, task: dict, out: Path) -> str:
  """Per arm, the tuning score relative to its best (%, worse is up)
  against the learning rate relative to the best."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  higher = task['higher_is_better']
  for i, (arm, s) in enumerate(task['analysis']['sensitivity'].items()):
    finite = {lr: v for lr, v in s['scores'].items() if math.isfinite(v)}
    if not finite:
      continue
    best_lr = min(finite, key=lambda lr: -finite[lr] if higher else finite[lr])
    lrs = sorted(finite)
    worse = [
      100 * (s['best'] - finite[lr]) / abs(s['best'])
      if higher
      else 100 * (finite[lr] - s['best']) / abs(s['best'])
      for lr in lrs
    ]
    style = '-' if i < 10 else '--'
    ax.plot(
      [lr / best_lr for lr in lrs], worse, style, marker='o', ms=3, label=arm
    )
  ax.axhline(100 * protocol.SENSITIVITY, color='grey', ls=':', lw=1)
  ax.set_xscale('log', base=2)
  ax.set_ylim(-0.2, 10)
  ax.set(
    xlabel="learning rate / the arm's best",
    ylabel='tuning score worse than the best (%)',
    title=f'{name}: learning-rate sensitivity (tuning seeds; dotted: 1%)',
  )
  ax.legend(fontsize=6, ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = f'{name}_lr_sensitivity.png'
  fig.savefig(out / path, dpi=100)
  plt.close(fig)
  return path


def batch_size(study: dict, base: dict, out: Path) -> str:
  """Test metric (mean and 95% CI over the evaluation seeds) against the
  batch size, Adam and the recommended candidate."""
  from benchmarks import stats

  plt = _pyplot()
  scale, label = _scale(base)
  fig, ax = plt.subplots(figsize=(6, 4))
  for arm in ('adam', study['recommended']['name']):
    points = {study['base_batch']: base['arms'][arm]['eval']}
    for batch, result in study['batch_sizes'].items():
      points[int(batch)] = result['arms'][arm]['eval']
    xs, means, halves = [], [], []
    for batch in sorted(points):
      values = [r['test'][base['metric']] * scale for r in points[batch]]
      ci = stats.paired(values, [0.0] * len(values))['ci']
      xs.append(batch)
      means.append(float(np.mean(values)))
      halves.append((ci[1] - ci[0]) / 2)
    ax.errorbar(xs, means, yerr=halves, marker='o', capsize=3, label=arm)
  ax.set_xscale('log', base=2)
  ax.set(
    xlabel='batch size (same epochs; learning rate tuned per size)',
    ylabel=f'test {label}',
    title=f'{study["task"]}: batch size (95% CI over evaluation seeds)',
  )
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = 'batch_size.png'
  fig.savefig(out / path, dpi=100)
  plt.close(fig)
  return path


def all_plots(tasks: dict, batch: dict | None, out: Path) -> dict[str, list]:
  figures = {}
  for name, task in tasks.items():
    figures[name] = [
      curves(name, task, out),
      forest(name, task, out),
      lr_sensitivity(name, task, out),
    ]
  if batch and batch['task'] in tasks:
    figures['batch'] = [batch_size(batch, tasks[batch['task']], out)]
  return figures
