"""Pilot runs behind the protocol's horizons and learning-rate centres.

    python -m benchmarks.pilot --task cnn --horizon   # Adam at H/2, H, 2H
    python -m benchmarks.pilot --task cnn --sweep     # every arm, 1/4 of H

``--horizon``: Adam (one pilot seed, 1000; two learning rates) at half,
once and twice the task's horizon, to show where its validation metric
flattens. ``--sweep``: every primary arm of the task at a quarter of the
horizon, one pilot seed, learning rates 4x apart around the protocol's
prior centre; the grid centre of the full runs is the best of these. The
pilot seed is neither a tuning nor an evaluation seed. Results:
``pilot_<task>.json`` in ``--out-dir`` and a line per result on stdout.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from benchmarks import cli, grid, protocol, report, runner, tasks
from benchmarks.evidence import RESULTS, Context

PILOT_SEED = 1000


def with_horizon(config, factor: float):
  """``config`` trained ``factor`` times as long."""
  if isinstance(config, tasks.ShakespeareConfig):
    return dataclasses.replace(config, steps=round(config.steps * factor))
  return dataclasses.replace(config, epochs=config.epochs * factor)


def _context(name: str, factor: float) -> Context:
  ctx = Context(name, 'full', cli.RESULTS, resume=False)
  config = with_horizon(ctx.proto.config, factor)
  ctx.task = tasks.build(config)
  ctx.evaluator = runner.Evaluator(ctx.task)
  return ctx


def horizon(name: str, rates: list[float]) -> list[dict]:
  rows = []
  for factor in (0.5, 1.0, 2.0):
    ctx = _context(name, factor)
    arm = protocol.ADAM
    start = time.perf_counter()
    results = ctx.train(
      arm, [runner.Run(lr, PILOT_SEED, ctx.task.steps) for lr in rates]
    )
    seconds = time.perf_counter() - start
    for lr, r in zip(rates, results):
      rows.append(
        {
          'factor': factor,
          'steps': ctx.task.steps,
          'learning_rate': lr,
          'validation': r['validation'],
          'curve': r['curve'],
          'seconds_per_step': seconds / len(rates) / ctx.task.steps,
        }
      )
      print(
        f'{name} adam x{factor:g} ({ctx.task.steps} steps) lr {lr:g}: '
        f'{r["validation"]} ({rows[-1]["seconds_per_step"] * 1e3:.1f} ms/step)',
        flush=True,
      )
  return rows


def sweep(name: str, arms: list[str], count: int = 4) -> dict[str, dict]:
  ctx = _context(name, 0.25)
  out = {}
  for arm in protocol.PRIMARY:
    if arms and arm.name not in arms:
      continue
    center = ctx.proto.centers[arm.name]
    values = grid.initial(center, count, 4.0)
    decay = arm.kwargs['weight_decay'] if arm in protocol.DECAYED else None
    results = ctx.train(
      arm, [runner.Run(lr, PILOT_SEED, ctx.task.steps, decay) for lr in values]
    )
    scores = {
      lr: [r['validation'][ctx.task.metric]] for lr, r in zip(values, results)
    }
    best = grid.choose(scores, ctx.task.higher_is_better)
    out[arm.name] = {
      'prior_center': center,
      'scores': {lr: s[0] for lr, s in scores.items()},
      'best': best,
    }
    print(
      f'{name} {arm.name}: best {best} of '
      + ', '.join(f'{lr:.3g}: {s[0]:.4f}' for lr, s in scores.items()),
      flush=True,
    )
  return out


def main(argv=None):
  parser = cli.parser(__doc__.splitlines()[0], RESULTS)
  parser.add_argument('--task', required=True)
  parser.add_argument('--horizon', action='store_true')
  parser.add_argument('--sweep', action='store_true')
  parser.add_argument(
    '--rates', default='', help='--horizon: comma-separated Adam rates'
  )
  parser.add_argument('--arms', default='', help='--sweep: these arms only')
  args = parser.parse_args(argv)
  path = Path(args.out_dir) / f'pilot_{args.task}.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  result = report.loose(json.loads(path.read_text())) if path.exists() else {}
  result['machine_line'] = cli.machine_line()
  if args.horizon:
    center = protocol.PROTOCOL['full'].tasks[args.task].centers['adam']
    rates = [float(r) for r in args.rates.split(',') if r] or [
      center / 2,
      center,
    ]
    result['horizon'] = horizon(args.task, rates)
    report.write_json(result, path)
  if args.sweep:
    arms = [a for a in args.arms.split(',') if a]
    result['sweep'] = {**result.get('sweep', {}), **sweep(args.task, arms)}
    report.write_json(result, path)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
