"""GPU tier of the evidence benchmark: a ResNet on all of Fashion-MNIST.

    python -m benchmarks.gpu_tier                 # one H200: <= 8 minutes
    python -m benchmarks.gpu_tier --tiny          # a CPU check of the logic

The ResNet-style CNN (BatchNorm) of :mod:`benchmarks.models` trains on the
55,000/5,000 split of the CPU tier for ``--epochs`` epochs. Each arm is one
program: its 7 learning rates x 13 seeds (0-12) train together (``jax.vmap``
inside one jitted scan), so it compiles once; the learning rate is chosen on
seeds 0-2 (validation accuracy) and seeds 3-12 at that rate are reported
(test accuracy), paired, against Adam and SGD-momentum, as in
:mod:`benchmarks.evidence`. There is no grid extension here: a best rate at
an end of the grid is flagged. The relative damping is fixed at ``a = 0.1``
(not tuned, to fit the time) and compared with ``a = inf`` and the permuted
control at 0.1. Arms run in the order of :data:`ARMS` while the time budget
allows (the time of the first arm predicts the others); the JSON is written
after every arm. Equal-time comparisons are not made on this tier.
"""

from __future__ import annotations

import math
import time
import warnings

from benchmarks import cli, grid, report, runner, tasks
from benchmarks import optimizers as opt

ARMS = [
  (opt.ADAM, 2e-3),
  (opt.SGDM, 0.1),
  (opt.REF, 5e-4),
  (opt.RELATIVE[math.inf], 0.5),
  (opt.RELATIVE[0.1], 0.25),
  (opt.permuted(opt.RELATIVE[0.1]), 0.25),
  (opt.PAPER[1e-2], 0.02),
  (opt.ADAMW, 2e-3),
]
FULL = tasks.FashionConfig(resnet=(32, 64, 128), batch_size=128, epochs=5)
TINY = tasks.FashionConfig(
  resnet=(4, 8),
  batch_size=16,
  epochs=1,
  validation_size=128,
  train_limit=128,
  test_limit=128,
  eval_batch=128,
)
TUNE_SEEDS, EVAL_SEEDS = (0, 1, 2), tuple(range(3, 13))


def main(argv=None):
  parser = cli.parser(__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true', help='a CPU logic check')
  parser.add_argument('--epochs', type=float, default=None)
  parser.add_argument('--budget-minutes', type=float, default=8.0)
  parser.add_argument('--grid-count', type=int, default=7)
  parser.add_argument(
    '--arms',
    default='',
    help='comma-separated subset of: ' + ', '.join(a.name for a, _ in ARMS),
  )
  args = parser.parse_args(argv)
  config = TINY if args.tiny else FULL
  if args.epochs:
    config = tasks.dataclasses.replace(config, epochs=args.epochs)
  seeds = (TUNE_SEEDS + EVAL_SEEDS)[: 5 if args.tiny else None]
  tune, evaluate = seeds[:3], seeds[3:]
  count = 2 if args.tiny else args.grid_count
  start = time.perf_counter()
  task = tasks.fashion_mnist(config)
  evaluator = runner.Evaluator(task)
  info = cli.machine_info()
  entry = {
    'description': task.description,
    'info': task.info,
    'metric': task.metric,
    'higher_is_better': True,
    'margin': task.margin,
    'steps': task.steps,
    'trains_threshold': task.trains_threshold,
    'tune_seeds': list(tune),
    'eval_seeds': list(evaluate),
    'arms': {},
    'decision_arms': {
      'a_star': 0.1,
      'best': opt.RELATIVE[0.1].name,
      'inf': opt.RELATIVE[math.inf].name,
      'permuted': opt.permuted(opt.RELATIVE[0.1]).name,
      'text': 'Decision rule (GPU tier, a fixed at 0.1 before the run): the '
      'curvature helps only if a = 0.1 beats both a = inf and the permuted '
      'control at 0.1 on seeds 3-12, Holm over the two comparisons.',
    },
  }
  state = {
    'tier': 'gpu' + ('-tiny' if args.tiny else ''),
    'date': cli.utc_now(),
    'command': cli.command('benchmarks.gpu_tier', argv),
    'machine': info,
    'machine_line': cli.machine_line(info),
    'protocol_text': __doc__.split('\n\n', 2)[2].strip(),
    'skipped': [],
    'tasks': {task.name: entry},
  }
  stem = 'evidence_gpu' + ('_tiny' if args.tiny else '')
  out = args.out_dir
  out.mkdir(parents=True, exist_ok=True)
  budget = 60 * args.budget_minutes
  per_arm = None
  wanted = [a for a in args.arms.split(',') if a]
  for arm, center in ARMS:
    if wanted and arm.name not in wanted:
      continue
    elapsed = time.perf_counter() - start
    if per_arm is not None and elapsed + per_arm > budget:
      state['skipped'].append(f'{arm.name}: not run (time budget)')
      continue
    arm_start = time.perf_counter()
    values = grid.initial(center, count)
    runs = [runner.Run(lr, s, task.steps) for lr in values for s in seeds]
    with warnings.catch_warnings():
      warnings.filterwarnings('ignore', message='.*donated.*')
      results = runner.train(
        task, arm, runs, curve_points=8, test=True, evaluator=evaluator
      )
    scores = {}
    for r in results:
      if r['seed'] in tune:
        scores.setdefault(r['learning_rate'], []).append(
          r['validation']['accuracy']
        )
    chosen = grid.choose(scores, True)
    entry['arms'][arm.name] = {
      'arm': arm.describe(),
      'chosen': chosen,
      'best_at_grid_end': chosen in (values[0], values[-1]),
      'grid': {
        'initial': values,
        'runs': [r for r in results if r['seed'] in tune],
      },
      'eval': [
        r
        for r in results
        if r['seed'] in evaluate and r['learning_rate'] == chosen
      ],
      'other_eval_runs': [
        r
        for r in results
        if r['seed'] in evaluate and r['learning_rate'] != chosen
      ],
      'seconds': time.perf_counter() - arm_start,
    }
    per_arm = max(per_arm or 0.0, time.perf_counter() - arm_start)
    state['wall_seconds'] = time.perf_counter() - start
    report.write_json(state, out / f'{stem}.json')
    print(f'{arm.name}: lr {chosen} ({per_arm:.0f} s)', flush=True)
  entry['analysis'] = report.analyse(entry)
  entry['plot_groups'] = {'arms': list(entry['arms'])}
  suffix = '_gpu' + ('_tiny' if args.tiny else '')
  entry['plots'] = report.plot_task(
    task.name, entry, entry['analysis'], out, suffix
  )
  state['wall_seconds'] = time.perf_counter() - start
  report.write_json(state, out / f'{stem}.json')
  (out / f'{stem}.md').write_text(report.markdown(state))
  print(f'wrote {out / stem}.json and .md')
  return state


if __name__ == '__main__':
  main()
