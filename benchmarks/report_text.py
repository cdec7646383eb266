"""The evidence report as Markdown (tables from the analysed task JSON)."""

from __future__ import annotations

import math

import numpy as np

from benchmarks import grid, protocol, stats


def _fmt(value: float, digits: int) -> str:
  return 'nan' if not math.isfinite(value) else f'{value:.{digits}f}'


def _signed(value: float, digits: int) -> str:
  return 'nan' if not math.isfinite(value) else f'{value:+.{digits}f}'


def _p(value: float) -> str:
  if not math.isfinite(value):
    return 'nan'
  return f'{value:.2g}' if value >= 1e-3 else f'{value:.0e}'


def _lr(value) -> str:
  return 'adaptive' if value is None else f'{value:.3g}'


def _units(task) -> tuple[float, int, str]:
  if task['metric'] == 'accuracy':
    return 100.0, 2, 'test accuracy (%)'
  unit = 'nats/char' if task['task'] == 'gpt' else 'nats/image'
  return 1.0, 4 if task['task'] == 'gpt' else 2, f'test loss ({unit})'


def cell(row: dict | None, scale: float, digits: int) -> str:
  if row is None:
    return '-'
  low, high = (c * scale for c in row['ci'])
  return (
    f'{_signed(row["mean"] * scale, digits)} [{_signed(low, digits)}, '
    f'{_signed(high, digits)}] p={_p(row["holm_p"])} **{row["verdict"]}**'
  )


def view_table(task: dict, view: str) -> list[str]:
  scale, digits, label = _units(task)
  data = task['analysis']['views'][view]
  rows = {(r['arm'], r['versus']): r for r in data['comparisons']}
  refs = ['adam'] + [task['best_peer']] * (task.get('best_peer') != 'adam')
  header = ' | '.join(f'vs {r}' for r in refs)
  lines = [
    f'| arm | lr | decay | steps | {label} | {header} |',
    '|---|---:|---:|---:|---:|' + '---|' * len(refs),
  ]
  for arm, summary in data['summary'].items():
    entry = task['arms'][arm]
    steps = task['steps']
    timing = entry.get('equal_time') or {}
    if view == 'equal_time' and timing.get('runs'):
      steps = timing['steps']
    decay = entry.get('chosen_decay')
    cells = ' | '.join(cell(rows.get((arm, r)), scale, digits) for r in refs)
    lines.append(
      f'| {arm} | {_lr(entry.get("chosen"))} | '
      f'{"-" if decay is None else f"{decay:g}"} | {steps} | '
      f'{_fmt(summary["mean"] * scale, digits)} ± '
      f'{_fmt(summary["std"] * scale, digits)} | {cells} |'
    )
  return lines


def timing_lines(task: dict) -> list[str]:
  timing = task.get('timing')
  if not timing:
    return []
  cells = []
  for name, ratio in timing['ratio'].items():
    low, high = timing['ratio_ci'][name]
    plan = (task['arms'].get(name, {}).get('equal_time') or {}).get('plan')
    cells.append(
      f'{name} {ratio:.3f} [{low:.3f}, {high:.3f}]'
      + (f' ({plan})' if plan else '')
    )
  return [
    f'Step-time ratios to Adam (geometric mean of {timing["rounds"]} '
    f'interleaved rounds of {timing["steps_per_round"]} steps, 95% CI; '
    'plan for equal time): ' + '; '.join(cells) + '.',
    '',
  ]


def replication_lines(task: dict) -> list[str]:
  rep = task.get('replication')
  if not rep:
    return ['Replication: not run.', '']
  if 'error' in rep:
    return [f'Replication failed: `{rep["error"][-300:]}`', '']
  by_arm = ', '.join(
    f'{n}: {v["identical"]}/{v["runs"]} runs identical'
    for n, v in rep['by_arm'].items()
  )
  verdict = (
    'bit for bit: the runs are deterministic, so the second replication of '
    'every arm gives the same verdicts as the first'
    if rep['identical']
    else 'NOT identical: verdicts stand only where both replications agree'
  )
  return [f'Replication in a fresh process ({by_arm}): {verdict}.', '']


def controls_lines(task: dict) -> list[str]:
  rows = task['analysis']['controls']
  if not rows:
    return []
  scale, digits, _ = _units(task)
  lines = [
    '### Controls (equal steps, Holm over the two)',
    '',
    '| comparison | difference [95% CI], Holm p, verdict |',
    '|---|---|',
  ]
  for row in rows:
    lines.append(
      f'| {row["arm"]} - {row["versus"]} | {cell(row, scale, digits)} |'
    )
  return lines + [
    '',
    'Permuted: the same factors shuffled within each layer (does the '
    "curvature's shape help?); Adafactor: the gradient's own factored second "
    'moment (do the captured statistics beat it?).',
    '',
  ]


def tuning_table(task: dict) -> list[str]:
  scale, digits, _ = _units(task)
  lines = [
    '| arm | chosen lr | decay | within 1% of best | tried (lr: mean validation) |',
    '|---|---:|---:|---|---|',
  ]
  sens = task['analysis']['sensitivity']
  for arm, entry in task['arms'].items():
    s = sens.get(arm)
    if not s:
      lines.append(
        f'| {arm} | {_lr(entry.get("chosen"))} | - | - | (not tuned) |'
      )
      continue
    tried = ', '.join(
      ('**' if lr == entry['chosen'] else '')
      + f'{_lr(lr)}: {_fmt(v * scale, digits)}'
      + ('**' if lr == entry['chosen'] else '')
      for lr, v in s['scores'].items()
    )
    span = (
      '-'
      if not s['range']
      else f'{_lr(s["range"][0])}-{_lr(s["range"][1])} ({s["factor"]:.0f}x)'
    )
    decay = entry.get('chosen_decay')
    lines.append(
      f'| {arm} | {_lr(entry["chosen"])} | '
      f'{"-" if decay is None else f"{decay:g}"} | {span} | {tried} |'
    )
  return lines


def task_section(name: str, task: dict, figures: list[str]) -> list[str]:
  lines = [f'## {name}', '', task['description'], '']
  lines += [
    f'Run: {task["date"]}, commit {task.get("git_commit")}, '
    f'{task["machine_line"]}, wall time '
    f'{task.get("wall_seconds", math.nan) / 60:.0f} min. Best peer on the '
    f'tuning seeds: `{task.get("best_peer")}`; best candidate: '
    f'`{task.get("best_candidate")}`; best relative damping: '
    f'`{task.get("best_relative")}`.',
    '',
  ]
  lines += timing_lines(task) + replication_lines(task)
  for view, title in (
    ('equal_steps', f'Equal steps ({task["steps"]} steps)'),
    ('equal_time', "Equal time (Adam's time for its steps)"),
  ):
    lines += [f'### {title}', '', *view_table(task, view), '']
  skipped = task['analysis'].get('inconclusive_timing')
  if skipped:
    lines += [
      'Equal time inconclusive (timing), left out: ' + ', '.join(skipped),
      '',
    ]
  lines += controls_lines(task)
  lines += ['### Learning rates (tuning seeds)', '', *tuning_table(task), '']
  lines += [f'![{name}]({f})' for f in figures] + ['']
  return lines


def recommendation_lines(rec: dict, tasks: dict) -> list[str]:
  names = list(rec['deficits'])
  lines = [
    '## The recommended drop-in configuration',
    '',
    protocol.SELECTION_RULE,
    '',
    f'**Chosen: `{rec["name"]}`** (over the tasks {", ".join(rec["tasks"])}).',
    '',
    '| candidate | ' + ' | '.join(rec['tasks']) + ' | mean deficit |',
    '|---|' + '---:|' * (len(rec['tasks']) + 1),
  ]

  def deficit(value):
    return 'out' if value == math.inf else _fmt(value, 2)

  for n in names:
    cells = ' | '.join(deficit(rec['deficits'][n][t]) for t in rec['tasks'])
    lines.append(f'| {n} | {cells} | {deficit(rec["means"][n])} |')
  return lines + [
    '',
    "Deficit: (Adam's tuning score - the candidate's) / margin (sign "
    'flipped for a loss): positive is worse than Adam, in margins; out: '
    'not run or did not train on that task.',
    '',
  ]


def summary_lines(tasks: dict, rec: dict) -> list[str]:
  """Per task: the best peer, the recommended candidate, the default."""
  lines = [
    '## Summary (evaluation seeds, equal steps)',
    '',
    '| task | best peer | recommended | vs best peer | AdaFisher default | '
    'vs best peer |',
    '|---|---|---|---|---|---|',
  ]
  lines += [
    _summary_row(name, task, rec['name']) for name, task in tasks.items()
  ]
  return lines + ['']


def _summary_row(name: str, task: dict, recommended: str) -> str:
  scale, digits, _ = _units(task)
  data = task['analysis']['views']['equal_steps']
  rows = {(r['arm'], r['versus']): r for r in data['comparisons']}
  peer = task.get('best_peer')
  cells = []
  for arm in (recommended, 'adafisher'):
    s = data['summary'].get(arm)
    cells.append('-' if not s else f'{arm} {_fmt(s["mean"] * scale, digits)}')
    versus = rows.get((arm, peer))
    cells.append(
      '(is the best peer)' if arm == peer else cell(versus, scale, digits)
    )
  s = data['summary'].get(peer)
  best = '-' if not s else f'{peer} {_fmt(s["mean"] * scale, digits)}'
  return f'| {name} | {best} | ' + ' | '.join(cells) + ' |'


def batch_lines(study: dict, tasks: dict) -> list[str]:
  base = tasks.get(study['task'])
  if not base:
    return []
  scale, digits, label = _units(base)
  rec = study['recommended']['name']
  lines = [
    f'## Batch size ({study["task"]})',
    '',
    f'Adam and `{rec}` (recommended over {study["recommended"]["tasks"]} when '
    'this ran), same epochs, learning rate tuned per batch size.',
    '',
    f'| batch | Adam lr | Adam {label} | {rec} lr | {rec} | difference '
    '[95% CI] |',
    '|---:|---:|---:|---:|---:|---|',
  ]
  points = {study['base_batch']: {a: base['arms'][a] for a in ('adam', rec)}}
  for batch, result in study['batch_sizes'].items():
    points[int(batch)] = result['arms']
  for batch in sorted(points):
    arms = points[batch]
    values = {
      a: {r['seed']: r['test'][base['metric']] for r in arms[a]['eval']}
      for a in ('adam', rec)
    }
    seeds = sorted(set(values['adam']) & set(values[rec]))
    diff = stats.paired(
      [values[rec][s] for s in seeds], [values['adam'][s] for s in seeds]
    )
    mean = {
      a: float(np.mean(list(v.values()))) * scale for a, v in values.items()
    }
    lines.append(
      f'| {batch} | {_lr(arms["adam"]["chosen"])} | '
      f'{_fmt(mean["adam"], digits)} | {_lr(arms[rec]["chosen"])} | '
      f'{_fmt(mean[rec], digits)} | '
      f'{_signed(diff["mean"] * scale, digits)} '
      f'[{_signed(diff["ci"][0] * scale, digits)}, '
      f'{_signed(diff["ci"][1] * scale, digits)}] |'
    )
  return lines + ['']


def markdown(tier_name, tasks, rec, batch, figures) -> str:
  lines = [
    f'# Evidence: should I switch from Adam, and to what? ({tier_name})',
    '',
    protocol.VERDICT_RULE,
    '',
  ]
  lines += recommendation_lines(rec, tasks) + summary_lines(tasks, rec)
  for name, task in tasks.items():
    lines += task_section(name, task, figures.get(name, []))
  if batch:
    lines += batch_lines(batch, tasks)
    lines += [f'![batch size]({f})' for f in figures.get('batch', [])] + ['']
  first = next(iter(tasks.values()), None)
  if first:
    lines += [first['protocol_text'], '']
  return '\n'.join(lines)


def trained_range(entry: dict) -> str:
  """The learning rates at which every tuning run trained."""
  trains = {}
  for run in entry['grid']['runs']:
    trains.setdefault(run['learning_rate'], []).append(run['trains'])
  found = grid.trained_range(trains)
  return '-' if found is None else f'{_lr(found[0])}-{_lr(found[1])}'


def _sentence(name: str, task: dict, recommended: str) -> str:
  """One sentence: the recommended candidate against Adam and the best
  peer at equal steps (the verdicts of the report)."""
  rows = {
    (r['arm'], r['versus']): r
    for r in task['analysis']['views']['equal_steps']['comparisons']
  }
  adam = rows.get((recommended, 'adam'))
  peer = task.get('best_peer')
  versus_peer = rows.get((recommended, peer)) if peer != 'adam' else None
  parts = [f'`{recommended}` vs Adam: {adam["verdict"] if adam else "n/a"}']
  if versus_peer:
    parts.append(f'vs the best peer `{peer}`: {versus_peer["verdict"]}')
  return f'* **{name}**: ' + '; '.join(parts) + ' (equal steps).'


def readme_summary(tier_name: str, tasks: dict, rec: dict) -> str:
  """A ready-to-paste README section: per task the best peer, the
  recommended configuration and the default, a verdict per task, and the
  recommendation with the commands."""
  lines = [
    '## Results',
    '',
    f'`python -m benchmarks.evidence` ({tier_name} tier; protocol fixed '
    'before the runs: [benchmarks/results/evidence/report.md]'
    '(benchmarks/results/evidence/report.md)). Test metric on the '
    'evaluation seeds, paired differences to the best peer (chosen on the '
    'tuning seeds) with 95% CIs and Holm-adjusted p:',
    '',
    *summary_lines(tasks, rec)[2:],
    *[_sentence(n, t, rec['name']) for n, t in tasks.items()],
    '',
    f'Recommended drop-in configuration (chosen on the tuning seeds of '
    f'{", ".join(rec["tasks"])}): `{rec["name"]}`. Commands: '
    '`python -m benchmarks.evidence --task cnn --resume`, '
    '`--task autoencoder,batch --resume`, `--task gpt --resume`, then '
    '`--report`.',
    '',
  ]
  return '\n'.join(lines)
