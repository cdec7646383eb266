"""Evidence: on my kind of model, should I switch from Adam, and to what?

    python -m benchmarks.evidence --protocol-only          # the protocol
    python -m benchmarks.evidence --task cnn --resume      # one task
    python -m benchmarks.evidence --task autoencoder,batch --resume
    python -m benchmarks.evidence --task gpt --resume
    python -m benchmarks.evidence --report                 # tables, plots
    python -m benchmarks.evidence --quick                  # CI (1-2 min)

The protocol (:mod:`benchmarks.protocol`, fixed before the runs) tunes
every arm of a task alike on the tuning seeds (learning rate; weight decay
for the decayed arms), then runs it at its choice on the evaluation seeds
(test metric), at equal steps and, where its step time differs from Adam's,
at equal time; the evaluation of Adam and of the best candidate is
replicated in a fresh process and compared bit for bit. ``--task batch``
is the batch-size study (after its task). The recommended drop-in
configuration is chosen across tasks on the tuning seeds by the report.

Outputs in ``--out-dir`` (default ``benchmarks/results/evidence``;
``--quick``: ``benchmarks/results/evidence_quick``): ``<task>.json`` (every
run: config, seed, curve, final and test metrics, fingerprint), written
after every arm (``--resume`` goes on from it), ``batch_size.json``,
``protocol.md``, and from ``--report`` ``report.md`` with the plots.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks import cli, grid, kfac, protocol, report, runner, tasks
from benchmarks import optimizers as opt
from benchmarks.optimizers import Arm
from benchmarks.protocol import TaskProtocol, Tier

RESULTS = cli.RESULTS / 'evidence'


class Context:
  """One task's run: its protocol, data, evaluator, JSON state and log."""

  def __init__(self, name: str, tier_name: str, out: Path, resume: bool):
    self.name, self.tier_name, self.out = name, tier_name, out
    self.tier: Tier = protocol.PROTOCOL[tier_name]
    self.proto: TaskProtocol = self.tier.tasks[name]
    self.task = tasks.build(self.proto.config)
    self.task.margin = protocol.MARGINS[name]
    self.evaluator = runner.Evaluator(self.task)
    self.programs: dict = {}
    self.start = time.perf_counter()
    self.path = out / f'{name}.json'
    self.previous = self._previous() if resume else {}
    self.entry = self._new_entry()

  def _new_entry(self) -> dict[str, Any]:
    task = self.task
    info = cli.machine_info()
    return {
      'task': self.name,
      'tier': self.tier_name,
      'date': cli.utc_now(),
      'command': cli.command('benchmarks.evidence', None),
      'git_commit': cli.git_commit(),
      'machine': info,
      'machine_line': cli.machine_line(info),
      'protocol_text': protocol.text(self.tier_name),
      'description': task.description,
      'info': task.info,
      'metric': task.metric,
      'higher_is_better': task.higher_is_better,
      'margin': task.margin,
      'steps': task.steps,
      'trains_threshold': task.trains_threshold,
      'tune_seeds': list(self.tier.tune_seeds),
      'eval_seeds': list(self.tier.eval_seeds),
      'arms': {},
      'wall_seconds_before_resume': self.previous.get('wall_seconds', 0.0),
    }

  def _previous(self) -> dict:
    """The interrupted run's JSON, if it ran the same protocol."""
    if not self.path.exists():
      return {}
    previous = report.loose(json.loads(self.path.read_text()))
    same = previous.get('protocol_text') == protocol.text(self.tier_name)
    if not same or previous.get('description') != self.task.description:
      self.log(f'{self.path} ran another protocol: starting afresh')
      return {}
    _check_same_code(self.path, previous.get('git_commit'))
    return previous

  def cached(self, arm: Arm, part: str):
    """``part`` of ``arm`` from the interrupted run (same arm), or None."""
    old = self.previous.get('arms', {}).get(arm.name, {})
    if report.plain(old.get('arm')) != report.plain(arm.describe()):
      return None
    return old.get(part)

  def save(self) -> None:
    self.entry['wall_seconds'] = (
      self.entry['wall_seconds_before_resume']
      + time.perf_counter()
      - self.start
    )
    report.write_json(self.entry, self.path)

  def log(self, message: str) -> None:
    minutes = (time.perf_counter() - self.start) / 60
    print(f'[{minutes:5.1f} min] {self.name}: {message}', flush=True)

  def train(self, arm: Arm, runs, test=False, curve_points=None):
    return runner.train(
      self.task,
      arm,
      runs,
      curve_points=curve_points or self.proto.curve_points,
      test=test,
      evaluator=self.evaluator,
      programs=self.programs,
    )


def _check_same_code(path: Path, before: str | None) -> None:
  """Refuses to resume ``path`` with code that gives other bits.

  A run is reproducible bit for bit only with the library and benchmark
  code it ran with; a later commit can change the bits of AdaFisher's runs
  without changing its maths, and a resumed task would then mix the two.
  """
  now = cli.git_commit()
  if before is None or before == now:
    return
  clean = not before.endswith('+dirty') and not str(now).endswith('+dirty')
  source = cli.source_id('HEAD')
  if clean and source is not None and cli.source_id(before) == source:
    return
  commit = before.removesuffix('+dirty')
  raise SystemExit(
    f'{path} was run by commit {before}, and this checkout ({now}) has '
    'other library or benchmark code: resumed runs would not give the same '
    'bits as the stored ones. Resume in a worktree of that commit '
    f'(git worktree add ../evidence-{commit[:7]} {commit[:7]}, copy the '
    'JSON there, run benchmarks/run_full_tier.sh in it), or run without '
    '--resume to start afresh.'
  )


# ----------------------------------------------------------------- tuning


def _scores(runs, metric) -> dict[tuple, list[float]]:
  scores: dict[tuple, list[float]] = {}
  for run in runs:
    key = (run['learning_rate'], run['weight_decay'])
    scores.setdefault(key, []).append(run['validation'][metric])
  return scores


def _by_lr(runs, metric, decay=None) -> dict[float, list[float]]:
  return {
    lr: values
    for (lr, wd), values in _scores(runs, metric).items()
    if wd == decay
  }


def tune_learning_rate(ctx: Context, arm: Arm, center: float, decay=None):
  """The learning-rate grid (extended while its best is at an end)."""
  tier, task = ctx.tier, ctx.task
  values = grid.initial(center, tier.grid_count, protocol.GRID_FACTOR)
  runs, pending, extensions = [], values, 0
  while pending:
    runs += ctx.train(
      arm,
      [
        runner.Run(lr, s, task.steps, decay)
        for lr in pending
        for s in tier.tune_seeds
      ],
    )
    scores = _by_lr(runs, task.metric, decay)
    extra = grid.extension(scores, task.higher_is_better, protocol.GRID_FACTOR)
    if not any(math.isfinite(grid.mean_score(v)) for v in scores.values()):
      extra = min(scores) / protocol.GRID_FACTOR  # everything diverged
    pending = []
    if extra is not None and extensions < tier.max_extensions:
      extensions += 1
      pending = [extra]
  return values, extensions, runs


def tune(ctx: Context, arm: Arm, center: float) -> dict[str, Any]:
  """An arm's learning rate, then (decayed arms) its decay: the grid
  entry."""
  task = ctx.task
  tuned = arm.name in {a.name for a in protocol.DECAYED}
  decay = arm.kwargs['weight_decay'] if tuned else None
  values, extensions, runs = tune_learning_rate(ctx, arm, center, decay)
  lr = grid.choose(_by_lr(runs, task.metric, decay), task.higher_is_better)
  decays = [decay]
  if tuned and lr is not None:
    decays = [
      decay / protocol.DECAY_FACTOR,
      decay,
      decay * protocol.DECAY_FACTOR,
    ]
    runs += ctx.train(
      arm,
      [
        runner.Run(lr, s, task.steps, wd)
        for wd in (decays[0], decays[2])
        for s in ctx.tier.tune_seeds
      ],
    )
  at_lr = {
    wd: grid.mean_score(_scores(runs, task.metric).get((lr, wd), []))
    for wd in decays
  }
  best_decay = decay
  for wd, score in at_lr.items():
    if task.better(score, at_lr[best_decay]):
      best_decay = wd
  return {
    'initial': values,
    'extensions': extensions,
    'chosen': lr,
    'chosen_decay': best_decay if tuned else None,
    'decays_tried': decays if tuned else None,
    'score': at_lr[best_decay] if lr is not None else math.nan,
    'runs': runs,
  }


def tune_arm(ctx: Context, arm: Arm, center: float) -> None:
  start = time.perf_counter()
  result = ctx.cached(arm, 'grid')
  if result is not None:
    ctx.entry.setdefault('resumed_tuning', []).append(arm.name)
  else:
    result = tune(ctx, arm, center)
  ctx.entry['arms'][arm.name] = {
    'arm': arm.describe(),
    'grid': result,
    'chosen': result['chosen'],
    'chosen_decay': result['chosen_decay'],
    'tuning_seconds': time.perf_counter() - start,
  }
  decay = result['chosen_decay']
  ctx.log(
    f'{arm.name}: lr {result["chosen"]}'
    + (f', decay {decay:g}' if decay is not None else '')
    + f' (validation {ctx.task.metric} {result["score"]:.4f}, '
    f'{result["extensions"]} extensions, {time.perf_counter() - start:.0f} s)'
  )
  ctx.save()


def best_of(ctx: Context, names) -> str | None:
  """The arm of ``names`` with the best tuning score."""
  best = None
  for name in names:
    entry = ctx.entry['arms'].get(name)
    if not entry or 'grid' not in entry:
      continue
    score = entry['grid']['score']
    if best is None or ctx.task.better(score, best[1]):
      best = (name, score)
  return None if best is None else best[0]


# ------------------------------------------------------------- evaluation


def _time_ratio_plan(ratio: float, ci) -> str:
  """``same``, ``separate`` (equal-time runs) or ``inconclusive``."""
  low, high = ci
  bound = 1 + protocol.TIME_TOLERANCE
  if not (math.isfinite(low) and math.isfinite(high)):
    return 'same' if 1 / bound <= ratio <= bound else 'inconclusive'
  if 1 / bound <= low and high <= bound:
    return 'same'
  if low > bound or high < 1 / bound:
    return 'separate'
  return 'inconclusive'


def evaluate_arm(ctx: Context, arm: Arm, timing: dict) -> None:
  entry = ctx.entry['arms'][arm.name]
  cached = ctx.cached(arm, 'eval')
  if cached is not None and ctx.cached(arm, 'chosen') == entry['chosen']:
    entry['eval'] = cached
    entry['equal_time'] = ctx.cached(arm, 'equal_time')
    return
  start, task = time.perf_counter(), ctx.task
  lr, decay = entry['chosen'], entry.get('chosen_decay')
  if arm.has_learning_rate and lr is None:
    ctx.entry.setdefault('skipped', []).append(f'{arm.name}: nothing trained')
    return
  seeds = ctx.tier.eval_seeds
  runs = [runner.Run(lr, s, task.steps, decay) for s in seeds]
  ratio = timing['ratio'][arm.name]
  plan = (
    'same'
    if arm.name == 'adam'
    else _time_ratio_plan(ratio, timing['ratio_ci'][arm.name])
  )
  steps_time = grid.equal_time_steps(task.steps, 1.0, ratio)
  if plan == 'separate':
    runs += [runner.Run(lr, s, steps_time, decay) for s in seeds]
  results = ctx.train(arm, runs, test=True)
  entry['eval'] = results[: len(seeds)]
  entry['equal_time'] = {
    'plan': plan,
    'time_ratio': ratio,
    'time_ratio_ci': timing['ratio_ci'][arm.name],
    'steps': steps_time if plan == 'separate' else task.steps,
    'runs': results[len(seeds) :] or None,
  }
  entry['eval_seconds'] = time.perf_counter() - start
  ctx.log(f'{arm.name}: evaluated ({entry["eval_seconds"]:.0f} s)')
  ctx.save()


def measure_times(ctx: Context, arms: dict[str, Arm]) -> dict:
  cached = ctx.previous.get('timing')
  if cached and set(cached['ratio']) == set(arms):
    ctx.entry['timing'] = cached
    return cached
  rates = {n: ctx.entry['arms'][n]['chosen'] for n in arms}
  timing = runner.step_times(
    ctx.task,
    list(arms.values()),
    rounds=ctx.proto.timing_rounds,
    steps_per_round=ctx.proto.timing_steps,
    learning_rates=rates,
    programs=ctx.programs,
  )
  ctx.entry['timing'] = timing
  ctx.log(
    'step-time ratios to Adam '
    + ', '.join(
      f'{n} {r:.3f} [{c[0]:.3f}, {c[1]:.3f}]'
      for (n, r), c in zip(timing['ratio'].items(), timing['ratio_ci'].values())
    )
  )
  ctx.save()
  return timing


# ------------------------------------------------------------ replication


def replicate(ctx: Context, names: list[str]) -> None:
  """Runs the evaluation of ``names`` again in a fresh process and compares
  the fingerprints (bits of the final parameters) and test metrics."""
  if not names:
    return
  if ctx.previous.get('replication', {}).get('arms') == names:
    ctx.entry['replication'] = ctx.previous['replication']
    return
  command = [sys.executable, '-m', 'benchmarks.evidence', '--tier']
  command += [ctx.tier_name, '--out-dir', str(ctx.out), '--task', ctx.name]
  command += ['--replicate-worker', ','.join(names)]
  start = time.perf_counter()
  done = subprocess.run(command, capture_output=True, text=True)
  path = ctx.out / f'{ctx.name}_replication.json'
  if done.returncode != 0 or not path.exists():
    ctx.entry['replication'] = {'arms': names, 'error': done.stderr[-2000:]}
    ctx.log(f'replication failed: {done.stderr[-500:]}')
    return
  again = json.loads(path.read_text())
  ctx.entry['replication'] = compare_replication(ctx.entry, again, names)
  ctx.entry['replication']['seconds'] = time.perf_counter() - start
  ctx.log(f'replication: identical = {ctx.entry["replication"]["identical"]}')
  ctx.save()


def compare_replication(entry: dict, again: dict, names: list[str]) -> dict:
  arms, identical = {}, True
  for name in names:
    first = {r['seed']: r for r in entry['arms'][name]['eval']}
    second = {r['seed']: r for r in again[name]}
    same = [
      first[s]['fingerprint'] == second[s]['fingerprint']
      and first[s]['test'] == second[s]['test']
      for s in first
    ]
    arms[name] = {'runs': len(same), 'identical': sum(same)}
    identical &= all(same)
  return {'arms': names, 'by_arm': arms, 'identical': identical}


def replicate_worker(tier_name: str, name: str, out: Path, names) -> None:
  """The second process: the evaluation runs of ``names`` from the JSON."""
  ctx = Context(name, tier_name, out, resume=False)
  entry = report.loose(json.loads(ctx.path.read_text()))
  arms = protocol.arms_by_name()
  results = {}
  for arm_name in names:
    arm_entry = entry['arms'][arm_name]
    runs = [
      runner.Run(r['learning_rate'], r['seed'], r['steps'], r['weight_decay'])
      for r in arm_entry['eval']
    ]
    results[arm_name] = ctx.train(arms[arm_name], runs, test=True)
  report.write_json(results, out / f'{name}_replication.json')


# ------------------------------------------------------------------- task


def primary_arms(ctx: Context, only: list[str]) -> list[Arm]:
  wanted = ctx.proto.arms or tuple(a.name for a in protocol.PRIMARY)
  arms = [a for a in protocol.PRIMARY if a.name in wanted]
  if only:
    arms = [a for a in arms if a.name in only or a.name == 'adam']
  return arms


def run_task(
  name: str, tier_name: str, out: Path, resume: bool, only: list[str]
) -> dict:
  ctx = Context(name, tier_name, out, resume)
  ctx.log(ctx.task.description)
  arms: dict[str, Arm] = {}
  for arm in primary_arms(ctx, only):
    tune_arm(ctx, arm, ctx.proto.centers[arm.name])
    arms[arm.name] = arm
  _choose(ctx, arms)
  if ctx.entry['best_candidate']:
    best = arms[ctx.entry['best_candidate']]
    control = opt.permuted(best)
    tune_arm(ctx, control, ctx.entry['arms'][best.name]['chosen'])
    arms[control.name] = control
  if ctx.proto.kfac and (not only or 'kfac' in only):
    _add_kfac(ctx, arms)
  timing = measure_times(ctx, {'adam': arms['adam'], **arms})
  for arm in arms.values():
    evaluate_arm(ctx, arm, timing)
  picks = ['adam', ctx.entry['best_candidate']][: ctx.tier.replicate]
  replicate(ctx, [n for n in picks if n and ctx.entry['arms'][n].get('eval')])
  ctx.entry['analysis'] = report.analyse(ctx.entry)
  ctx.save()
  ctx.log(f'done: {ctx.path}')
  return ctx.entry


def _choose(ctx: Context, arms) -> None:
  """The best peer, candidate and relative damping on the tuning seeds."""
  peers = [a.name for a in protocol.PEERS if a.name in arms]
  candidates = [c.name for c in protocol.CANDIDATES if c.name in arms]
  ctx.entry['best_peer'] = best_of(ctx, peers)
  ctx.entry['best_candidate'] = best_of(ctx, candidates)
  ctx.entry['best_relative'] = protocol.relative_damping_best(
    ctx.entry, ctx.task.better
  )
  ctx.log(
    f'best peer {ctx.entry["best_peer"]}, best candidate '
    f'{ctx.entry["best_candidate"]}, best relative damping '
    f'{ctx.entry["best_relative"]} (tuning seeds)'
  )


def _add_kfac(ctx: Context, arms) -> None:
  if not kfac.AVAILABLE:
    ctx.entry.setdefault('skipped', []).append(f'kfac: {kfac.IMPORT_ERROR}')
    return
  arms[protocol.KFAC.name] = protocol.KFAC
  ctx.entry['arms'][protocol.KFAC.name] = {
    'arm': protocol.KFAC.describe(),
    'chosen': None,
    'chosen_decay': None,
  }


# ------------------------------------------------------------- batch size


def run_batch_study(tier_name: str, out: Path, resume: bool) -> dict:
  """Adam and the recommended candidate at other batch sizes (same
  epochs), each batch size's learning rate tuned on the tuning seeds."""
  tier = protocol.PROTOCOL[tier_name]
  name = tier.batch_task
  base = report.loose(json.loads((out / f'{name}.json').read_text()))
  recommended = report.recommend(report.load_tasks(out))
  arms = protocol.arms_by_name()
  path = out / 'batch_size.json'
  previous = (
    report.loose(json.loads(path.read_text()))
    if resume and (path.exists())
    else {}
  )
  study = {
    'task': name,
    'recommended': recommended,
    'base_batch': base['info']['config']['batch_size'],
    'batch_sizes': {},
    'protocol_text': protocol.text(tier_name),
  }
  for batch in tier.batch_sizes:
    done = previous.get('batch_sizes', {}).get(str(batch))
    if (
      done
      and previous.get('recommended', {}).get('name') == (recommended['name'])
    ):
      study['batch_sizes'][str(batch)] = done
      continue
    study['batch_sizes'][str(batch)] = _batch_size(
      tier_name, name, batch, base, [arms['adam'], arms[recommended['name']]]
    )
    report.write_json(study, path)
  report.write_json(study, path)
  return study


def _batch_size(tier_name, name, batch, base, arms) -> dict:
  import dataclasses

  tier = protocol.PROTOCOL[tier_name]
  config = dataclasses.replace(tier.tasks[name].config, batch_size=batch)
  ctx = Context(name, tier_name, cli.RESULTS, resume=False)
  ctx.task = tasks.build(config)
  ctx.task.margin = protocol.MARGINS[name]
  ctx.evaluator = runner.Evaluator(ctx.task)
  scale = math.sqrt(batch / base['info']['config']['batch_size'])
  result = {'description': ctx.task.description, 'arms': {}}
  for arm in arms:
    center = base['arms'][arm.name]['chosen'] * scale
    grid_entry = tune(ctx, arm, center)
    seeds = tier.eval_seeds
    runs = [runner.Run(grid_entry['chosen'], s, ctx.task.steps) for s in seeds]
    result['arms'][arm.name] = {
      'grid': grid_entry,
      'chosen': grid_entry['chosen'],
      'eval': ctx.train(arm, runs, test=True),
    }
    ctx.log(f'batch {batch}: {arm.name}: lr {grid_entry["chosen"]}')
  return result


# ------------------------------------------------------------------- main


def parse_args(argv):
  parser = cli.parser(__doc__.splitlines()[0], RESULTS)
  parser.description = __doc__
  add = parser.add_argument
  add('--quick', action='store_true', help='the CI tier (--tier quick)')
  add('--tier', choices=sorted(protocol.PROTOCOL), default='full')
  add('--task', default=None, help="comma-separated tasks, 'batch' too")
  add('--arms', default='', help='comma-separated subset (Adam always runs)')
  add('--resume', action='store_true', help='go on from the JSON in out-dir')
  add('--protocol-only', action='store_true', help='write protocol.md')
  add('--report', action='store_true', help='write report.md and the plots')
  add('--replicate-worker', default=None, help=argparse_hidden())
  args = parser.parse_args(argv)
  if args.quick:
    args.tier = 'quick'
    if args.out_dir == RESULTS:
      args.out_dir = cli.RESULTS / 'evidence_quick'
  _check_names(parser, args)
  return args


def _check_names(parser, args) -> None:
  """Refuses unknown tasks and arms before anything runs, and a subset of
  arms where the batch-size study (which needs the recommended candidate
  that only the whole set of arms picks) would follow."""
  tasks = [*protocol.PROTOCOL[args.tier].tasks, 'batch']
  names = args.task.split(',') if args.task else []
  unknown = [n for n in names if n not in tasks]
  if unknown:
    parser.error(f'--task: unknown {unknown} in tier {args.tier!r}; choose '
                 f'from {", ".join(tasks)}')  # fmt: skip
  arms = [a.name for a in protocol.PRIMARY] + ['kfac']
  only = [a for a in args.arms.split(',') if a]
  unknown = [a for a in only if a not in arms]
  if unknown:
    parser.error(f'--arms: unknown {unknown}; choose from {", ".join(arms)}')
  if only and (not names or 'batch' in names):
    parser.error(
      '--arms runs a subset of the arms: name the tasks with --task (not '
      "'batch': the batch-size study needs the candidate all arms choose)"
    )


def argparse_hidden():
  import argparse

  return argparse.SUPPRESS


def main(argv=None):
  args = parse_args(argv)
  tier = protocol.PROTOCOL[args.tier]
  out = Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'protocol.md').write_text(protocol.text(args.tier) + '\n')
  if args.protocol_only:
    print(f'wrote {out / "protocol.md"}')
    return None
  names = args.task.split(',') if args.task else [*tier.tasks, 'batch']
  if args.replicate_worker:
    replicate_worker(args.tier, names[0], out, args.replicate_worker.split(','))
    return None
  only = [a for a in args.arms.split(',') if a]
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message='.*donated.*')
    for name in names if not args.report else []:
      if name == 'batch':
        if tier.batch_task:
          run_batch_study(args.tier, out, args.resume)
      else:
        run_task(name, args.tier, out, args.resume, only)
  if args.report or not args.task:
    report.write_report(out, args.tier)
  return out


if __name__ == '__main__':
  main()
