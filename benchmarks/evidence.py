"""Evidence: does AdaFisher's curvature help? A protocol fixed before the runs.

    python -m benchmarks.evidence            # full CPU tier (~1 hour, 2 cores)
    python -m benchmarks.evidence --quick    # CI smoke run (minutes)
    python -m benchmarks.evidence --tasks shakespeare --arms adam,sgdm

Every arm (optimizer configuration) of every task is tuned on a grid of
learning rates with seeds 0-2 (validation metric), then run at its chosen
learning rate with seeds 3-12 at equal steps, and at equal time where its
measured step time differs from Adam's; the test metric of those runs is
compared with Adam's and with SGD-momentum's, seed by seed. The protocol
(:data:`PROTOCOL`, printed by :func:`protocol_text`) is written at the top
of the results; ``--protocol-only`` writes it alone.

Outputs in ``--out-dir``: ``evidence.json`` (every run: config, seed, curve,
final and test metrics, the step-time ratios used), ``evidence.md`` and
``evidence_<task>_{curves,differences}.png`` (``evidence_quick.*`` and
``evidence_quick_*.png`` with ``--quick``). The JSON is rewritten after every
arm, so an interrupted run keeps what it did.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks import cli, grid, kfac, report, runner, tasks
from benchmarks import optimizers as opt
from benchmarks.optimizers import Arm

# ------------------------------------------------------------ the protocol

GRID_COUNT, GRID_FACTOR, MAX_EXTENSIONS = 7, 2.0, 3
# An arm whose equal-time step count is within this fraction of Adam's
# steps uses its equal-steps runs as its equal-time runs.
EQUAL_TIME_TOLERANCE = 0.03
RELATIVE_CANDIDATES = (1.0, 0.1, 0.01)  # a*: the best of these (seeds 0-2)
PAPER_CANDIDATES = (1e-3, 1e-2, 1e-1)

PRIMARY = [
  opt.ADAM,
  opt.ADAMW,
  opt.SGDM,
  opt.REF,
  opt.REF_T1,
  *opt.PAPER.values(),
  *opt.RELATIVE.values(),
]


@dataclasses.dataclass(frozen=True)
class TaskProtocol:
  config: Any
  centers: dict[str, float]  # grid centre per arm (learning rate)
  kfac: bool  # whether kfac-jax runs on this task
  curve_points: int
  arms: tuple[str, ...] | None = None  # primary arms; None: all of PRIMARY
  timing_rounds: int = 30
  timing_steps: int = 10


@dataclasses.dataclass(frozen=True)
class Tier:
  tasks: dict[str, TaskProtocol]
  tune_seeds: tuple[int, ...]
  eval_seeds: tuple[int, ...]
  grid_count: int = GRID_COUNT
  max_extensions: int = MAX_EXTENSIONS


# Centres from one-seed pilot sweeps (4x apart, the full horizon) on the
# development machine; the grid extends when its best value is at an end.
FASHION_CENTERS = {
  'adam': 2e-3,
  'adamw': 2e-3,
  'sgdm': 0.05,
  'adafisher-ref': 5e-4,
  'adafisher-ref-t1': 5e-4,
  'adafisher-paper-0.001': 4e-3,
  'adafisher-paper-0.01': 0.02,
  'adafisher-paper-0.1': 0.08,
  'adafisher-rel-inf': 0.5,
  'adafisher-rel-1': 0.5,
  'adafisher-rel-0.1': 0.25,
  'adafisher-rel-0.01': 0.06,
}
SHAKESPEARE_CENTERS = {
  'adam': 6e-3,
  'adamw': 0.012,
  'sgdm': 0.3,
  'adafisher-ref': 4e-3,
  'adafisher-ref-t1': 2e-3,
  'adafisher-paper-0.001': 0.05,
  'adafisher-paper-0.01': 0.12,
  'adafisher-paper-0.1': 0.8,
  'adafisher-rel-inf': 1.5,
  'adafisher-rel-1': 6.0,
  'adafisher-rel-0.1': 4.0,
  'adafisher-rel-0.01': 1.0,
}

QUICK_FASHION = tasks.FashionConfig(
  widths=(32,),
  batch_size=64,
  epochs=1,
  validation_size=1000,
  train_limit=2048,
  test_limit=1000,
  eval_batch=1000,
)
QUICK_SHAKESPEARE = tasks.ShakespeareConfig(
  layers=1,
  d_model=32,
  heads=2,
  seq_len=32,
  batch_size=8,
  steps=40,
  validation_windows=32,
  test_windows=64,
  eval_batch=32,
)
DECISION_ARMS = ('adam', 'sgdm', 'adafisher-rel-inf', 'adafisher-rel-0.1')

PROTOCOL = {
  'full': Tier(
    tasks={
      'fashion_mnist': TaskProtocol(
        tasks.FashionConfig(), FASHION_CENTERS, kfac=True, curve_points=12
      ),
      'shakespeare': TaskProtocol(
        tasks.ShakespeareConfig(),
        SHAKESPEARE_CENTERS,
        kfac=False,
        curve_points=8,
      ),
    },
    tune_seeds=(0, 1, 2),
    eval_seeds=tuple(range(3, 13)),
  ),
  # CI: every module and every kind of arm, tiny.
  'quick': Tier(
    tasks={
      'fashion_mnist': TaskProtocol(
        QUICK_FASHION,
        FASHION_CENTERS,
        kfac=True,
        curve_points=4,
        arms=DECISION_ARMS + ('adafisher-ref', 'adafisher-paper-0.001'),
        timing_rounds=2,
        timing_steps=3,
      ),
      'shakespeare': TaskProtocol(
        QUICK_SHAKESPEARE,
        SHAKESPEARE_CENTERS,
        kfac=False,
        curve_points=4,
        arms=DECISION_ARMS,
        timing_rounds=2,
        timing_steps=3,
      ),
    },
    tune_seeds=(0,),
    eval_seeds=(3, 4, 5),
    grid_count=3,
    max_extensions=1,
  ),
  # The unit tests' end-to-end run: smaller still.
  'smoke': Tier(
    tasks={
      'fashion_mnist': TaskProtocol(
        dataclasses.replace(
          QUICK_FASHION, widths=(8,), train_limit=512, epochs=0.25
        ),
        FASHION_CENTERS,
        kfac=True,
        curve_points=2,
        arms=DECISION_ARMS,
        timing_rounds=1,
        timing_steps=2,
      ),
    },
    tune_seeds=(0,),
    eval_seeds=(1, 2),
    grid_count=2,
    max_extensions=1,
  ),
}

DECISION_RULE = (
  'Decision rule (declared before the runs): a* is the best of a in '
  '{1, 0.1, 0.01} on the tuning seeds (mean validation metric at each '
  "arm's own best learning rate). The curvature helps only if a* beats both "
  'a = inf (F~ = 1: momentum SGD) and the permuted control at a* on the '
  'evaluation seeds, at equal steps (the three arms cost the same per '
  'step), each paired difference significant after Holm correction over the '
  'two comparisons (its interval at the Holm level excludes 0 in favour of '
  'a*).'
)


def protocol_text(tier_name: str) -> str:
  tier = PROTOCOL[tier_name]
  lines = [
    f'## Protocol ({tier_name} tier; fixed before the runs)',
    '',
    '* Tasks:',
  ]
  for name, proto in tier.tasks.items():
    arms = proto.arms or tuple(a.name for a in PRIMARY)
    centers = ', '.join(f'{a} {proto.centers[a]:g}' for a in arms)
    lines += [
      f'  * `{name}`: {dataclasses.asdict(proto.config)}; validation curve '
      f'every 1/{proto.curve_points} of the horizon',
      f'    * arms and grid centres: {centers}; the controls; kfac-jax '
      + ('yes' if proto.kfac else 'no (budget)'),
    ]
  lines += [
    '  * Fashion-MNIST: the 60,000 training images split once 55,000 train / '
    '5,000 validation (fixed permutation); the 10,000 test images scored '
    'once, at the end. Shakespeare (char GPT): contiguous blocks, 90% '
    'train / 5% validation / 5% test, SHA-256 recorded.',
    '* Schedule, every arm: linear warmup over 5% of its steps, then cosine '
    'to zero at its own horizon (kfac-jax in its recommended configuration '
    'adapts its own learning rate and has no schedule).',
    f'* Learning rates: {tier.grid_count} values {GRID_FACTOR:g}x apart '
    'around a centre per arm (centres from one-seed pilot sweeps), the same '
    'count for every arm; a best value at an end of the values tried adds '
    f'the next value {GRID_FACTOR:g}x beyond it (at most '
    f'{tier.max_extensions} '
    'times). The best value: the best mean over the tuning seeds of the '
    'final validation metric (accuracy; loss for Shakespeare); a value with '
    'a non-finite run is out. Other hyperparameters are fixed per arm '
    '(Adam/AdamW: b1 0.9, b2 0.999, eps 1e-8; AdamW: decoupled weight decay '
    '0.1; SGD: momentum 0.9; AdaFisher: b1 0.9, gamma 0.8, no weight decay; '
    'damping per arm), except that the paper-numerics damping (1e-3, 1e-2, '
    '1e-1) and the relative damping a (inf, 1, 0.1, 0.01) are compared as '
    'arms, each with its own learning rate.',
    f'* Seeds: tune on {list(tier.tune_seeds)}; report on '
    f'{list(tier.eval_seeds)}, paired (a seed fixes the initialisation and '
    'the batch order for every arm and learning rate).',
    '* Arms: Adam, AdamW, SGD-momentum, AdaFisher reference (t_cov 100 and '
    '1), AdaFisher paper with damping 1e-3, 1e-2, 1e-1, AdaFisher paper with '
    'relative damping a in {inf, 1, 0.1, 0.01}; controls: the permuted '
    'factors at a* and the layer-mean F~ at the best paper damping (under '
    'relative damping the layer mean is a = inf by construction); kfac-jax '
    'as its README recommends (adaptive learning rate, momentum and damping, '
    'initial damping 1, L2 1e-3 in the loss) where it fits the budget, not '
    'tuned.',
    '* Report: final test metric per arm (mean, std over the evaluation '
    'seeds); paired differences against Adam and against SGD-momentum with '
    't-based 95% confidence intervals and Holm-adjusted p-values (Holm over '
    "each table's comparisons); margins 0.3 accuracy points "
    '(Fashion-MNIST), 0.01 nats/char (Shakespeare). Verdict per comparison: '
    'better/worse = Holm p < 0.05 and the mean difference beyond the margin; '
    'equivalent = the 95% CI inside +-margin; otherwise inconclusive.',
    '* Equal time: an arm gets round(N_adam x t_adam / t_arm) steps, each '
    'with its own schedule, at its equal-steps learning rate; t from '
    'interleaved step-cost rounds (one run, same batch, this machine, this '
    'process), never from the runs. Arms within '
    f'{EQUAL_TIME_TOLERANCE:.0%} of N_adam reuse their equal-steps runs.',
    '* Learning rates that train: a value trains when every tuning seed ends '
    'finite and past a threshold on the validation set (Fashion-MNIST: '
    'accuracy >= 0.80; Shakespeare: loss <= 2.6 nats/char).',
    '* ' + DECISION_RULE,
  ]
  return '\n'.join(lines)


# ------------------------------------------------------------------- runs


def _tune(task, arm: Arm, center: float, tier: Tier, proto, evaluator):
  """Grid runs of one arm; returns the grid entry."""
  values = grid.initial(center, tier.grid_count, GRID_FACTOR)
  runs = []
  pending = values
  extensions = 0
  while pending:
    runs += runner.train(
      task,
      arm,
      [
        runner.Run(lr, seed, task.steps)
        for lr in pending
        for seed in tier.tune_seeds
      ],
      curve_points=proto.curve_points,
      evaluator=evaluator,
    )
    scores = _scores(runs, task.metric)
    extra = grid.extension(scores, task.higher_is_better, GRID_FACTOR)
    pending = []
    if extra is not None and extensions < tier.max_extensions:
      extensions += 1
      pending = [extra]
  scores = _scores(runs, task.metric)
  chosen = grid.choose(scores, task.higher_is_better)
  return {
    'initial': values,
    'extensions': extensions,
    'chosen': chosen,
    'score': grid.mean_score(scores[chosen]) if chosen else math.nan,
    'runs': runs,
  }


def _scores(runs, metric):
  scores = {}
  for run in runs:
    scores.setdefault(run['learning_rate'], []).append(
      run['validation'][metric]
    )
  return scores


def run_task(name: str, tier: Tier, state: dict, save, log) -> None:
  proto = tier.tasks[name]
  task = tasks.build(name, proto.config)
  evaluator = runner.Evaluator(task)
  entry = state['tasks'][name] = {
    'description': task.description,
    'info': task.info,
    'metric': task.metric,
    'higher_is_better': task.higher_is_better,
    'margin': task.margin,
    'steps': task.steps,
    'trains_threshold': task.trains_threshold,
    'tune_seeds': list(tier.tune_seeds),
    'eval_seeds': list(tier.eval_seeds),
    'arms': {},
  }
  log(f'{name}: {task.description}')
  wanted = set(proto.arms) if proto.arms else None
  primary = [a for a in PRIMARY if wanted is None or a.name in wanted]
  if state['only_arms']:
    primary = [
      a
      for a in primary
      if a.name in state['only_arms'] or a.name in ('adam', 'sgdm')
    ]
  arms: dict[str, Arm] = {}

  previous = state['resume'].get(name, {})
  if previous.get('description') != task.description or previous.get(
    'tune_seeds'
  ) != list(tier.tune_seeds):
    previous = {}

  def tune(arm: Arm, center: float):
    start = time.perf_counter()
    cached = previous.get('arms', {}).get(arm.name, {})
    same = report.plain(cached.get('arm')) == report.plain(arm.describe())
    if cached.get('grid') and same:
      result = cached['grid']  # the same runs, from the interrupted run
      entry.setdefault('resumed_tuning', []).append(arm.name)
    else:
      result = _tune(task, arm, center, tier, proto, evaluator)
    arms[arm.name] = arm
    entry['arms'][arm.name] = {
      'arm': arm.describe(),
      'grid': result,
      'chosen': result['chosen'],
      'tuning_seconds': time.perf_counter() - start,
    }
    log(
      f'{name}: {arm.name}: chose lr {result["chosen"]} (validation '
      f'{task.metric} {result["score"]:.4f}, {result["extensions"]} '
      f'extensions, {time.perf_counter() - start:.0f} s)'
    )
    save()

  for arm in primary:
    tune(arm, proto.centers[arm.name])
  # Controls, defined by the tuning results.
  rule = None
  rel = {a: opt.RELATIVE[a].name for a in RELATIVE_CANDIDATES}
  rel = {a: n for a, n in rel.items() if n in entry['arms']}
  if rel and opt.RELATIVE[math.inf].name in entry['arms']:
    a_star = _best(entry, rel, task)
    base = opt.RELATIVE[a_star]
    control = opt.permuted(base)
    tune(control, entry['arms'][base.name]['chosen'])
    rule = {
      'a_star': a_star,
      'best': base.name,
      'inf': opt.RELATIVE[math.inf].name,
      'permuted': control.name,
      'text': DECISION_RULE,
    }
  paper = {d: opt.PAPER[d].name for d in PAPER_CANDIDATES}
  paper = {d: n for d, n in paper.items() if n in entry['arms']}
  if paper:
    d_star = _best(entry, paper, task)
    base = opt.PAPER[d_star]
    control = opt.layer_mean(base)
    tune(control, entry['arms'][base.name]['chosen'])
    entry['control_pairs'] = [[base.name, control.name]]
  entry['decision_arms'] = rule
  wants_kfac = not state['only_arms'] or 'kfac' in state['only_arms']
  if proto.kfac and wants_kfac and kfac.AVAILABLE:
    arms[opt.KFAC.name] = opt.KFAC
    entry['arms'][opt.KFAC.name] = {'arm': opt.KFAC.describe(), 'chosen': None}
  elif proto.kfac and wants_kfac:
    state['skipped'].append(f'{name} kfac: {kfac.IMPORT_ERROR}')
  elif not proto.kfac:
    state['skipped'].append(
      f"{name} kfac: not run (budget: its step cost 5.8x Adam's on this "
      'char GPT on 2 CPU cores when the protocol was sized, about 4 more '
      'minutes for its 10 seeds at equal steps)'
    )
  # Step-time ratios, measured now, at the chosen learning rates.
  order = ['adam'] + [n for n in arms if n != 'adam']
  timing = runner.step_times(
    task,
    [arms[n] for n in order],
    rounds=proto.timing_rounds,
    steps_per_round=proto.timing_steps,
    learning_rates={n: entry['arms'][n]['chosen'] or 1e-4 for n in order},
  )
  entry['timing'] = timing
  log(
    f'{name}: step-time ratios '
    + ', '.join(f'{n} {r:.3f}' for n, r in timing['ratio'].items())
  )
  save()
  # Evaluation seeds: equal steps, and equal time where it differs.
  for arm_name in order:
    arm, arm_entry = arms[arm_name], entry['arms'][arm_name]
    start = time.perf_counter()
    lr = arm_entry['chosen']
    if arm.has_learning_rate and lr is None:
      state['skipped'].append(f'{name} {arm_name}: no learning rate trained')
      continue
    steps_time = grid.equal_time_steps(
      task.steps,
      timing['median_seconds_per_step']['adam'],
      timing['median_seconds_per_step'][arm_name],
    )
    separate = (
      arm_name != 'adam'
      and abs(steps_time / task.steps - 1) > EQUAL_TIME_TOLERANCE
    )
    runs = [runner.Run(lr, s, task.steps) for s in tier.eval_seeds]
    if separate:
      runs += [runner.Run(lr, s, steps_time) for s in tier.eval_seeds]
    results = runner.train(
      task,
      arm,
      runs,
      curve_points=proto.curve_points,
      test=True,
      evaluator=evaluator,
    )
    n = len(tier.eval_seeds)
    arm_entry['eval'] = results[:n]
    arm_entry['equal_time'] = {
      'steps': steps_time if separate else task.steps,
      'computed_steps': steps_time,
      'time_ratio': timing['ratio'][arm_name],
      'runs': results[n:] if separate else None,
      'reuses_equal_steps': not separate,
    }
    arm_entry['eval_seconds'] = time.perf_counter() - start
    log(f'{name}: {arm_name}: evaluated ({time.perf_counter() - start:.0f} s)')
    save()
  entry['analysis'] = report.analyse(entry)
  save()


def _best(entry, candidates: dict, task) -> Any:
  """The candidate whose arm has the best tuning score."""
  best = None
  for key, arm_name in candidates.items():
    score = entry['arms'][arm_name]['grid']['score']
    if best is None or task.better(score, best[1]):
      best = (key, score)
  return best[0]


def main(argv=None):
  parser = cli.parser(__doc__.splitlines()[0])
  parser.description = __doc__
  parser.add_argument(
    '--quick', action='store_true', help='the CI tier (--tier quick)'
  )
  parser.add_argument('--tier', choices=sorted(PROTOCOL), default='full')
  parser.add_argument(
    '--tasks', default=None, help="comma-separated (default: the tier's)"
  )
  parser.add_argument(
    '--arms',
    default='',
    help='comma-separated subset of the arms (Adam and SGD-m always run)',
  )
  parser.add_argument(
    '--protocol-only', action='store_true', help='write the protocol and stop'
  )
  parser.add_argument(
    '--resume',
    type=Path,
    help="the JSON of an interrupted run of the same tier: its arms' "
    'learning-rate tuning is reused (timing and evaluation run again)',
  )
  parser.add_argument(
    '--report-from',
    type=Path,
    help='rewrite the analysis, Markdown and plots from this JSON and stop',
  )
  args = parser.parse_args(argv)
  if args.report_from:
    report_from(args.report_from)
    return None
  tier_name = 'quick' if args.quick else args.tier
  tier = PROTOCOL[tier_name]
  suffix = '' if tier_name == 'full' else f'_{tier_name}'
  stem = f'evidence{suffix}'
  out = args.out_dir
  out.mkdir(parents=True, exist_ok=True)
  if args.protocol_only:
    path = out / f'{stem}.md'
    path.write_text(
      f"# Evidence: does AdaFisher's curvature help? ({tier_name})\n\n"
      + protocol_text(tier_name)
      + '\n\n(results pending)\n'
    )
    print(f'wrote {path}')
    return None
  start = time.perf_counter()
  info = cli.machine_info()
  state = {
    'tier': tier_name,
    'date': cli.utc_now(),
    'command': cli.command('benchmarks.evidence', argv),
    'machine': info,
    'machine_line': cli.machine_line(info),
    'protocol_text': protocol_text(tier_name),
    'protocol': {
      'tune_seeds': list(tier.tune_seeds),
      'eval_seeds': list(tier.eval_seeds),
      'grid_count': tier.grid_count,
      'grid_factor': GRID_FACTOR,
      'max_extensions': tier.max_extensions,
      'equal_time_tolerance': EQUAL_TIME_TOLERANCE,
      'warmup_fraction': runner.WARMUP_FRACTION,
      'centers': {n: p.centers for n, p in tier.tasks.items()},
      'decision_rule': DECISION_RULE,
    },
    'only_arms': [a for a in args.arms.split(',') if a],
    'resume': (
      report.loose(json.loads(args.resume.read_text())['tasks'])
      if args.resume
      else {}
    ),
    'resumed_from': str(args.resume) if args.resume else None,
    'resumed_wall_seconds': (
      json.loads(args.resume.read_text()).get('wall_seconds')
      if args.resume
      else None
    ),
    'skipped': [],
    'tasks': {},
  }

  def save():
    state['wall_seconds'] = time.perf_counter() - start
    report.write_json(state, out / f'{stem}.json')

  def log(message):
    print(
      f'[{(time.perf_counter() - start) / 60:5.1f} min] {message}', flush=True
    )

  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message='.*donated.*')
    names = args.tasks.split(',') if args.tasks else list(tier.tasks)
    for name in names:
      run_task(name, tier, state, save, log)
      save()
  state['wall_seconds'] = time.perf_counter() - start
  write_report(state, out, suffix)
  save()
  log(f'wrote {out / stem}.json, .md and plots')
  return state


def plot_groups(arms) -> dict[str, list[str]]:
  published = ('adam', 'adamw', 'sgdm', 'adafisher-ref', 'adafisher-ref-t1')
  published += tuple(opt.PAPER[d].name for d in PAPER_CANDIDATES) + ('kfac',)
  return {
    'baselines and AdaFisher as published': [n for n in published if n in arms],
    'relative damping and controls': [
      n
      for n in arms
      if n.startswith('adafisher-rel') or n.endswith('+mean') or n == 'sgdm'
    ],
  }


def write_report(state: dict, out: Path, suffix: str) -> None:
  """Analysis, plots and Markdown of the tasks in ``state``."""
  for name, task in state['tasks'].items():
    task['analysis'] = report.analyse(task)
    task['plot_groups'] = plot_groups(task['arms'])
    task['plots'] = report.plot_task(name, task, task['analysis'], out, suffix)
  summary = f'evidence_summary{suffix}.png'
  report.plot_differences(
    {n: (t, t['analysis']) for n, t in state['tasks'].items()},
    out / summary,
    views=('equal_steps',),
  )
  state['summary_plot'] = summary
  (out / f'evidence{suffix}.md').write_text(report.markdown(state))


def report_from(path: Path) -> None:
  """Rewrites the analysis, plots and Markdown from a run's JSON."""
  state = report.loose(json.loads(path.read_text()))
  state['rendered'] = (
    f'{cli.utc_now()}: `python -m benchmarks.evidence --report-from {path}`'
  )
  suffix = path.stem.removeprefix('evidence')
  write_report(state, path.parent, suffix)
  report.write_json(state, path)


if __name__ == '__main__':
  main()
