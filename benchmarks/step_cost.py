"""Step cost: time, compile time, memory and state of AdaFisher, optax, kfac-jax.

Every optimizer trains the same model from the same initialisation on the
same batch in one process. Steps are timed in interleaved rounds (A, B, C, A,
B, C, ...; each round ``--steps-per-round`` steps) after a warm-up, and the
medians compared, so the ratios hold on a noisy shared machine.

Compile cost, per program: the seconds to trace and lower it
(``jit(...).trace(...).lower()``) and XLA's compile seconds
(``.compile()``), next to Adam's step and as ratios to it, measured in one
process. ``--compile-only`` measures only these (with abstract parameters,
so nothing is allocated), ``--compile-rounds`` times, each program freshly
built in every round and the rounds interleaved; with two rounds or more
each ratio has a 95% confidence interval (t interval of the per-round log
ratios).

Memory, per program:

* ``compiled``: XLA's memory analysis of the compiled program,
  ``argument + output - alias + temp`` bytes (donated buffers counted once;
  the peak of the program as XLA plans it); every backend has it;
* ``peak``: ``device.memory_stats()['peak_bytes_in_use']`` after a few steps
  in a fresh process per optimizer (the counter never goes down), where the
  backend has memory statistics (GPU, TPU; not CPU);
* ``state``: the bytes of the optimizer state.

Models (:mod:`benchmarks.workloads`): ``mlp``, ``cnn``, ``gpt`` (measured
by default) and the GPT-2-sized ``gpt2-small`` (12 blocks, d_model 768, 12
heads, vocab 50257, tied embeddings, no ``nn.scan``), ``gpt2-24`` and
``gpt2-4``, whose step times are measured only with ``--time-large`` on a
CPU backend (their compile cost and memory always).

AdaFisher runs two programs: the refresh step (statistics captured, factors
refreshed) and the plain step (``capture=False``, no curvature: momentum
divided by the stored ``F~``). Both are timed in the same rounds; with
``t_cov=p`` a step costs ``(refresh + (p - 1) * plain) / p`` (amortised),
and ``t_cov=1`` is the refresh step every step. Every program's compiled HLO
is read for its kernel count (instructions of the entry computation other
than parameters, constants, tuples and bitcasts) and XLA's cost analysis
for the bytes it moves per parameter.

Targets, AdaFisher vs Adam (CPU): time <= 1.03x with ``t_cov=1``, <= 1.00x
amortised at ``t_cov=100`` (the reference default), state <= 0.51x.

    python -m benchmarks.step_cost --models mlp --rounds 3     # smoke run
    python -m benchmarks.step_cost                             # everything
    python -m benchmarks.step_cost --compile-only --models gpt2-small,gpt2-24 \\
        --optimizers adam,adafisher-ref                        # compile cost
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from benchmarks import cli, kfac
from benchmarks import compile_cost as cc
from benchmarks import optimizers as opt
from benchmarks import workloads as wl
from benchmarks.compile_cost import compile_markdown, compile_notes
from benchmarks.measure import (
  bytes_accessed,
  compile_seconds,
  compiled_memory,
  device_peak_bytes,
  interleaved_rounds,
  kernel_count,
  machine,
  mb,
  tree_bytes,
)
from benchmarks.training import init_model, make_train_step
from benchmarks.workloads import WORKLOADS, Workload

LEARNING_RATE = 1e-3
WARMUP_STEPS = 3
TIME_TARGETS = {1: 1.03, 100: 1.00}  # t_cov -> max time / Adam (CPU)
STATE_TARGET = 0.51  # max state / Adam
RESULTS = Path(__file__).resolve().parent / 'results'

#: The optimizers, by command-line name (learning rate ``LEARNING_RATE``).
OPTIMIZERS: dict[str, opt.Arm] = {
  'adam': opt.arm('adam', 'optax.adam', 'optax', optimizer='adam'),
  'adamw': opt.arm('adamw', 'optax.adamw', 'optax', optimizer='adamw'),
  'sgdm': opt.arm(
    'sgdm', 'optax.sgd momentum 0.9', 'optax', optimizer='sgd', momentum=0.9
  ),
  'adafisher-ref-t1': opt.REF_T1.variant(
    'adafisher-ref-t1', 'AdaFisher reference t_cov=1'
  ),
  'adafisher-ref': opt.REF.variant(
    'adafisher-ref', 'AdaFisher reference t_cov=100 (default), amortised'
  ),
  'adafisher-paper': opt.arm(
    'adafisher-paper',
    'AdaFisher paper t_cov=1 (default)',
    'adafisher',
    numerics='paper',
  ),
  'adafisher-paper-t100': opt.arm(
    'adafisher-paper-t100',
    'AdaFisher paper t_cov=100, amortised',
    'adafisher',
    numerics='paper',
    t_cov=100,
  ),
  'kfac': opt.KFAC_FIXED,
  'adafisher-rms': opt.arm(
    'adafisher-rms',
    "AdaFisher grafting='rms' t_cov=100, amortised",
    'adafisher',
    grafting='rms',
  ),
  'adafisher-adam': opt.arm(
    'adafisher-adam',
    "AdaFisher grafting='adam' t_cov=100, amortised",
    'adafisher',
    grafting='adam',
  ),
  'adafisher-like-adam': opt.LIKE_ADAM.variant(
    'adafisher-like-adam', 'afo.adafisher_like_adam t_cov=100, amortised'
  ),
}


@dataclasses.dataclass
class Run:
  """One program of an optimizer on one workload: a step and its state.

  ``program``: ``step`` (optax, kfac-jax), or AdaFisher's ``refresh`` and
  ``plain`` steps.
  """

  name: str
  step: Callable
  state: list
  state_bytes: int
  memory: dict[str, int] | None
  program: str = 'step'
  kernels: int | None = None
  bytes_accessed: float | None = None
  note: str = ''
  times: list[float] = dataclasses.field(default_factory=list)
  cpu_times: list[float] = dataclasses.field(default_factory=list)
  loss: float = math.nan
  compile: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def key(self) -> str:
    return self.name if self.program != 'plain' else f'{self.name}/plain'


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def programs_of(name: str) -> list[str]:
  return opt.programs(OPTIMIZERS[name])


def build_runs(name: str, work: Workload, params, model_state) -> list[Run]:
  """Compiles ``name``'s programs for ``work`` (each donating its own
  copies)."""
  return [
    build_run(name, work, params, model_state, p) for p in programs_of(name)
  ]


def build_run(
  name: str, work: Workload, params, model_state, program: str = 'step'
) -> Run:
  """Compiles one program of ``name`` for ``work``."""
  arm = OPTIMIZERS[name]
  params, model_state = _copy(params), _copy(model_state)
  if arm.family == 'kfac':
    step, init = kfac.make_kfac_train_step(work.model, LEARNING_RATE)
    opt_state = init(params, model_state, work.x, work.y)
    memory, note = kfac_memory(step, params, model_state, opt_state, work)
    return Run(
      name,
      step,
      [params, model_state, opt_state],
      kfac.state_bytes(opt_state),
      memory,
      note=note,
    )
  tx = opt.make(arm, LEARNING_RATE, layout=cc.layout(arm, work, params))
  opt_state = tx.init(params)
  step = make_train_step(work.model, tx, adafisher=arm.captures)
  seconds, compiled = compile_seconds(
    step, params, model_state, opt_state, work.x, work.y, program != 'plain'
  )
  return Run(
    name,
    compiled,
    [params, model_state, opt_state],
    tree_bytes(opt_state),
    compiled_memory(compiled),
    program,
    kernel_count(compiled.as_text()),
    bytes_accessed(compiled),
    compile=seconds,
  )


def kfac_memory(step, params, model_state, opt_state, work):
  """Memory analysis of kfac-jax's step (its private ``_step``, jitted whole).

  The analysed program updates the curvature estimate (kfac-jax does so every
  step by default) and holds the inverse refresh under a ``lax.cond``, so its
  temporaries are those of the costliest step.
  """
  optimizer = step.built['optimizer']
  with_state = step.built['with_state']
  scalars = [jnp.asarray(v, jnp.float32) for v in (LEARNING_RATE, 0.9, 1e-3)]

  def one_step(params, model_state, state, rng, batch):
    return optimizer._step(
      params,
      state,
      rng,
      batch,
      model_state if with_state else None,
      *scalars,
      True,  # should_update_estimate_curvature (kfac-jax's default: always)
      False,  # should_update_damping (fixed damping)
    )

  try:
    compiled = (
      jax.jit(one_step, donate_argnums=(0, 1, 2))  # as kfac-jax donates
      .lower(
        params, model_state, opt_state.kfac, opt_state.rng, (work.x, work.y)
      )
      .compile()
    )
  except Exception as error:  # kfac-jax internals (private API) changed
    return None, f'no memory analysis: {type(error).__name__}: {error}'
  return compiled_memory(compiled), ''


def advance(run: Run, work: Workload, steps: int) -> None:
  params, model_state, opt_state = run.state
  for _ in range(steps):
    params, model_state, opt_state, loss = run.step(
      params, model_state, opt_state, work.x, work.y
    )
  run.loss = float(loss)  # waits for the last step
  run.state = [params, model_state, opt_state]


KFAC_CONV_CPU = (
  "kfac-jax's conv factors (patches second moments, computed with "
  'convolutions) take seconds per step on XLA:CPU even at batch 8 (measured '
  '3-9 s per step with curvature updates vs 0.04 s without, on 2 cores); '
  'pass --kfac-conv-on-cpu to time it anyway'
)


def skip_reason(model_name: str, name: str, kfac_conv_on_cpu: bool):
  """Why ``name`` is not measured on ``model_name`` here (``None``: it is)."""
  if name != 'kfac':
    return None
  if not kfac.AVAILABLE:
    return f'kfac-jax unavailable: {kfac.IMPORT_ERROR}'
  cpu = jax.default_backend() == 'cpu'
  if model_name == 'cnn' and cpu and not kfac_conv_on_cpu:
    return KFAC_CONV_CPU
  return None


def _compile_and_warm(name, work, params, model_state, model_name, skipped):
  """``name``'s programs, compiled and warmed up (``None``: skipped)."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always', opt.Unpreconditioned)
    try:
      programs = build_runs(name, work, params, model_state)
      for run in programs:
        advance(run, work, WARMUP_STEPS)
    except Exception as error:
      if name != 'kfac':
        raise
      # kfac-jax leans on JAX internals: report, and go on without it.
      skipped.append(
        f'{model_name} {name}: failed: {type(error).__name__}: {error}'
      )
      print(f'NOTE: skipped {skipped[-1]}')
      return None
  for warning in caught:
    if issubclass(warning.category, opt.Unpreconditioned):
      programs[0].note += f' {warning.category.__name__}: {warning.message}'
    else:
      warnings.showwarning(
        warning.message, warning.category, warning.filename, warning.lineno
      )
  return programs


def measure(
  model_name: str,
  names: list[str],
  rounds: int,
  steps_per_round: int,
  skipped: list[str],
  kfac_conv_on_cpu: bool = False,
  work: Workload | None = None,
) -> tuple[list[dict], Workload]:
  """Rows of one model; appends ``'model optimizer: why'`` to ``skipped``."""
  work = work or wl.build(model_name)
  params, model_state = init_model(work.model, work.x)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  runs: dict[str, list[Run]] = {}
  for name in tqdm(names, desc=f'{model_name}: compile', leave=False):
    reason = skip_reason(model_name, name, kfac_conv_on_cpu)
    if reason:
      skipped.append(f'{model_name} {name}: {reason}')
      print(f'NOTE: skipped {skipped[-1]}')
      continue
    programs = _compile_and_warm(
      name, work, params, model_state, model_name, skipped
    )
    if programs is not None:
      runs[name] = programs
  every = [run for programs in runs.values() for run in programs]
  walls, cpus = interleaved_rounds(
    {
      run.key: lambda run=run: advance(run, work, steps_per_round)
      for run in every
    },
    rounds,
    desc=f'{model_name}: rounds',
  )
  for run in every:
    run.times = [t / steps_per_round for t in walls[run.key]]
    run.cpu_times = [t / steps_per_round for t in cpus[run.key]]
  rows = [
    _row(
      model_name,
      name,
      programs,
      runs,
      rounds,
      n_params,
      rounds * steps_per_round,
    )
    for name, programs in runs.items()
  ]
  return rows, work


def _per_step(runs, name: str, field: str) -> list[float]:
  """Seconds per step, per round: amortised over AdaFisher's programs."""
  programs = {run.program: getattr(run, field) for run in runs[name]}
  if 'plain' not in programs:
    return list(next(iter(programs.values())))
  p = opt.refresh_period(OPTIMIZERS[name])
  return [
    (r + (p - 1) * q) / p
    for r, q in zip(programs['refresh'], programs['plain'])
  ]


def _row(model_name, name, programs, runs, rounds, n_params, steps) -> dict:
  """The table row of one optimizer, with ratios to Adam's."""
  base = runs.get('adam')
  base_time = base_best = base_cpu = base_state = math.nan
  if base:
    base_time = statistics.median(_per_step(runs, 'adam', 'times'))
    base_best = min(_per_step(runs, 'adam', 'times'))
    base_cpu = statistics.median(_per_step(runs, 'adam', 'cpu_times'))
    base_state = base[0].state_bytes
  base_compile = (base[0].compile if base else {}) or {}
  times, cpu_times = (
    _per_step(runs, name, 'times'),
    _per_step(runs, name, 'cpu_times'),
  )
  median = statistics.median(times)
  q1, _, q3 = statistics.quantiles(times, n=4) if rounds > 1 else [0] * 3
  arm = OPTIMIZERS[name]
  first = programs[0]
  return {
    'model': model_name,
    'optimizer': name,
    'label': arm.label,
    'numerics': arm.numerics if arm.captures else None,
    't_cov': opt.refresh_period(arm) if arm.captures else None,
    'step_ms': 1e3 * median,
    'step_ms_iqr': [1e3 * q1, 1e3 * q3],
    'time_vs_adam': median / base_time,
    'best_step_ms': 1e3 * min(times),
    'best_vs_adam': min(times) / base_best,
    'process_cpu_ms': 1e3 * statistics.median(cpu_times),
    'process_cpu_vs_adam': statistics.median(cpu_times) / base_cpu,
    'programs': {
      run.program: _program_entry(run, base_time, base_compile, n_params)
      for run in programs
    },
    'state_bytes': first.state_bytes,
    'state_vs_adam': first.state_bytes / base_state,
    'compiled_memory': first.memory,
    'peak_bytes_in_use': None,
    'loss_after': first.loss,
    'steps': WARMUP_STEPS + steps,
    'note': first.note,
  }


def _program_entry(run: Run, base_time, base_compile, n_params) -> dict:
  per_parameter = (
    None if run.bytes_accessed is None else run.bytes_accessed / n_params
  )
  entry = {
    'step_ms': 1e3 * statistics.median(run.times),
    'vs_adam': statistics.median(run.times) / base_time,
    'kernels': run.kernels,
    'bytes_per_parameter': per_parameter,
    'compile_seconds': run.compile or None,
  }
  if run.compile and base_compile:
    entry['trace_lower_vs_adam'] = (
      run.compile['trace_lower'] / base_compile['trace_lower']
    )
    entry['compile_vs_adam'] = run.compile['compile'] / base_compile['compile']
  return entry


def probe_peak(model_name: str, name: str, steps: int) -> int | None:
  """Peak device bytes of ``steps`` steps of one optimizer (this process)."""
  work = wl.build(model_name)
  params, model_state = init_model(work.model, work.x)
  for run in build_runs(name, work, params, model_state):
    advance(run, work, steps)
  return device_peak_bytes()


def isolated_peaks(rows: list[dict], steps: int) -> None:
  """Fills ``peak_bytes_in_use``, each optimizer in a fresh process."""
  for row in tqdm(rows, desc='peak memory (one process each)', leave=False):
    command = [sys.executable, '-m', 'benchmarks.step_cost', '--probe-peak']
    command += [row['model'], row['optimizer'], str(steps)]
    result = subprocess.run(
      command, capture_output=True, text=True, env=dict(os.environ)
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode == 0 and lines:
      row['peak_bytes_in_use'] = json.loads(lines[-1])['peak_bytes_in_use']
    else:
      row['note'] += f' peak probe failed: {result.stderr.strip()[-300:]}'


# ------------------------------------------------------------------ report


def targets(row) -> list[tuple[str, float, float, bool]]:
  """``(what, value, bound, passed)`` for the AdaFisher rows."""
  if row['numerics'] is None:
    return []
  checks = []
  bound = TIME_TARGETS.get(row['t_cov'])
  if bound is not None:
    value = row['time_vs_adam']
    checks.append(('time / Adam', value, bound, value <= bound))
  value = row['state_vs_adam']
  checks.append(('state / Adam', value, STATE_TARGET, value <= STATE_TARGET))
  return checks


def markdown(rows) -> str:
  lines = [
    '| model | optimizer | step (ms) | time / Adam | best / Adam | '
    'state (MB) | state / Adam | compiled (MB) | peak (MB) | targets |',
    '|---|---|---:|---:|---:|---:|---:|---:|---:|---|',
  ]
  for r in rows:
    memory = r['compiled_memory'] or {}
    marks = ', '.join(
      f'{"pass" if ok else "FAIL"} {what.split()[0]} <= {bound}'
      for what, _, bound, ok in targets(r)
    )
    lines.append(
      f'| {r["model"]} | {r["label"]} | {r["step_ms"]:.2f} | '
      f'{r["time_vs_adam"]:.3f} | {r["best_vs_adam"]:.3f} | '
      f'{mb(r["state_bytes"])} | '
      f'{r["state_vs_adam"]:.3f} | {mb(memory.get("total"))} | '
      f'{mb(r["peak_bytes_in_use"])} | {marks} |'
    )
  return '\n'.join(lines)


def _seconds(program: dict, part: str) -> str:
  value = (program.get('compile_seconds') or {}).get(part)
  return '-' if value is None else f'{value:.2f}'


def _ratio(program: dict, key: str) -> str:
  value = program.get(key)
  return '-' if value is None else f'{value:.2f}'


def programs_markdown(rows) -> str:
  """Each compiled program: time, kernels, bytes moved per parameter and
  compile cost (one measurement each, ratio to Adam's step)."""
  lines = [
    '| model | optimizer | program | step (ms) | time / Adam | kernels | '
    'bytes / parameter | trace+lower (s) | / Adam | compile (s) | / Adam |',
    '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in rows:
    for program, p in r['programs'].items():
      per_parameter = p['bytes_per_parameter']
      kernels = p['kernels'] if p['kernels'] is not None else '-'
      lines.append(
        f'| {r["model"]} | {r["label"]} | {program} | {p["step_ms"]:.2f} | '
        f'{p["vs_adam"]:.3f} | {kernels} | '
        f'{"-" if per_parameter is None else f"{per_parameter:.1f}"} | '
        f'{_seconds(p, "trace_lower")} | {_ratio(p, "trace_lower_vs_adam")} | '
        f'{_seconds(p, "compile")} | {_ratio(p, "compile_vs_adam")} |'
      )
  return '\n'.join(lines)


def target_report(rows) -> tuple[str, bool]:
  lines, all_pass = [], True
  for r in rows:
    for what, value, bound, ok in targets(r):
      all_pass &= ok
      lines.append(
        f'[{"PASS" if ok else "FAIL"}] {r["model"]}: {r["label"]}: '
        f'{what} = {value:.3f} (target <= {bound})'
      )
  return '\n'.join(lines) or '(no AdaFisher rows)', all_pass


LEGEND = (
  'step: median over rounds of the mean step time in a round; best: the '
  'fastest round (less sensitive to other load on the machine); compiled: '
  'argument + output - alias + temp bytes of the compiled step (XLA memory '
  'analysis); peak: device peak_bytes_in_use in a fresh process ("-": not '
  'reported by this backend).'
)


PROGRAMS_LEGEND = (
  'program: step (one program), refresh (AdaFisher capturing statistics and '
  'refreshing the factors) or plain (no statistics, stored factors); '
  'kernels: instructions of the compiled entry computation other than '
  'parameters, constants, tuples and bitcasts; bytes / parameter: XLA cost '
  "analysis' bytes accessed by the whole step, per parameter of the model; "
  'trace+lower and compile: seconds of `jit(step).trace(...).lower()` and '
  "`.compile()`, one measurement each, / Adam: the ratio to Adam's step."
)


def workload_lines(workloads: dict) -> list[str]:
  lines = []
  for model_name, info in workloads.items():
    lines.append(f'* {model_name}: {info["description"]}')
    if 'sha256' in info:
      lines.append(
        f'  data: {info["source"]}, train {info["train_chars"]} chars '
        f'(sha256 {info["sha256"]["train"]}), validation '
        f'{info["validation_chars"]} chars '
        f'(sha256 {info["sha256"]["validation"]})'
      )
  return lines


def _write(out: Path, stem: str, text: str, result: dict) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / f'{stem}.md').write_text(text + '\n')
  (out / f'{stem}.json').write_text(json.dumps(result, indent=2) + '\n')
  print(f'\nwrote {out / stem}.md and {out / stem}.json')


# -------------------------------------------------------------------- main


def parse_args(argv):
  parser = argparse.ArgumentParser(
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=f'optimizers: {", ".join(OPTIMIZERS)}; models: '
    f'{", ".join(WORKLOADS)}',
  )
  add = parser.add_argument
  add('--models', default=','.join(wl.DEFAULT), help='comma-separated')
  add(
    '--optimizers',
    default=','.join(OPTIMIZERS),
    help='comma-separated (adam is always added: ratios are to it)',
  )
  add('--rounds', type=int, default=20, help='timed rounds (median)')
  add(
    '--steps-per-round',
    type=int,
    default=5,
    help='steps per round (5: one kfac-jax inverse refresh per round)',
  )
  add(
    '--peak-memory',
    choices=('auto', 'isolated', 'off'),
    default='auto',
    help='peak_bytes_in_use in a fresh process per optimizer: auto = where '
    'the backend reports memory statistics',
  )
  add('--out-dir', default=str(RESULTS), help='where the results go')
  add(
    '--kfac-conv-on-cpu',
    action='store_true',
    help='also time kfac-jax on the CNN on a CPU backend (very slow)',
  )
  add(
    '--compile-only',
    action='store_true',
    help='measure only trace+lower and compile seconds, kernels, memory '
    'and state (abstract arguments: nothing allocated, nothing run); '
    'writes step_cost_compile[_TAG].{json,md}',
  )
  add(
    '--compile-rounds',
    type=int,
    default=1,
    help='--compile-only: rounds (>= 2 gives each ratio a 95%% CI)',
  )
  add('--tag', default='', help='suffix of the output files (before/after)')
  add('--gpt2-batch', type=int, default=None, help='GPT-2 rows: batch')
  add('--gpt2-seq', type=int, default=None, help='GPT-2 rows: sequence')
  add(
    '--time-large',
    action='store_true',
    help='also time the steps of the GPT-2-sized models on CPU',
  )
  add('--probe-peak', nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  names = [n for n in args.optimizers.split(',') if n]
  models = [m for m in args.models.split(',') if m]
  unknown = [n for n in names if n not in OPTIMIZERS]
  unknown += [m for m in models if m not in WORKLOADS]
  if unknown:
    parser.error(f'unknown: {unknown}')
  if 'adam' not in names:
    names.insert(0, 'adam')
  for flag in ('rounds', 'compile_rounds', 'steps_per_round'):
    if getattr(args, flag) < 1:
      parser.error(f'--{flag.replace("_", "-")} must be >= 1')
  for flag in ('gpt2_batch', 'gpt2_seq'):
    if getattr(args, flag) is not None and getattr(args, flag) < 1:
      parser.error(f'--{flag.replace("_", "-")} must be >= 1')
  return args, names, models


def main_compile_only(args, names, models) -> None:
  """``--compile-only``: the compile-cost table of every model."""
  jax.jit(lambda a: a + 1).lower(1.0).compile()  # backend start-up, untimed
  names = [n for n in names if OPTIMIZERS[n].family != 'kfac']
  rows, workloads = [], {}
  shape = {'batch': args.gpt2_batch, 'seq': args.gpt2_seq}
  for model_name in models:
    work = wl.build(model_name, **shape)
    workloads[model_name] = {'description': work.description, **work.data}
    rows += _compile_costs(model_name, names, args.compile_rounds, work)
  header = (
    f'{machine()}; compile cost, {args.compile_rounds} round(s); '
    f'`{_command(args)}`; commit {cli.git_commit()}'
  )
  text = '\n'.join(
    [header, '', *workload_lines(workloads), '', compile_markdown(rows)]
    + ['', cc.COMPILE_LEGEND, *compile_notes(rows)]
  )
  print(text)
  result = {
    'machine': machine(),
    'command': _command(args),
    'git_commit': cli.git_commit(),
    'compile_rounds': args.compile_rounds,
    'workloads': workloads,
    'rows': rows,
  }
  suffix = f'_{args.tag}' if args.tag else ''
  _write(Path(args.out_dir), f'step_cost_compile{suffix}', text, result)


def _compile_costs(model_name, names, rounds, work) -> list[dict]:
  arms = {n: OPTIMIZERS[n] for n in names}
  return cc.compile_costs(model_name, arms, rounds, work, LEARNING_RATE)


def _command(args) -> str:
  del args
  return 'python -m benchmarks.step_cost ' + ' '.join(sys.argv[1:])


def main(argv=None):
  args, names, models = parse_args(argv)
  if args.probe_peak:
    model_name, name, steps = args.probe_peak
    peak = probe_peak(model_name, name, int(steps))
    print(json.dumps({'peak_bytes_in_use': peak}))
    return
  if args.compile_only:
    main_compile_only(args, names, models)
    return
  rows, compile_rows, workloads, skipped = [], [], {}, []
  shape = {'batch': args.gpt2_batch, 'seq': args.gpt2_seq}
  cpu = jax.default_backend() == 'cpu'
  for model_name in models:
    work = wl.build(model_name, **shape)
    workloads[model_name] = {'description': work.description, **work.data}
    if work.large and cpu and not args.time_large:
      plain = [n for n in names if OPTIMIZERS[n].family != 'kfac']
      compile_rows += _compile_costs(model_name, plain, 1, work)
      skipped.append(
        f'{model_name}: step time not measured on CPU (pass '
        '--time-large); compile cost and memory below'
      )
      continue
    model_rows, _ = measure(
      model_name,
      names,
      args.rounds,
      args.steps_per_round,
      skipped,
      args.kfac_conv_on_cpu,
      work,
    )
    rows += model_rows
  peak = args.peak_memory
  if peak == 'isolated' or (peak == 'auto' and device_peak_bytes() is not None):
    isolated_peaks(rows, WARMUP_STEPS + args.steps_per_round)
  _report(args, rows, compile_rows, workloads, skipped)


def _report(args, rows, compile_rows, workloads, skipped) -> None:
  header = (
    f'{machine()}; rounds={args.rounds} x {args.steps_per_round} steps '
    f'after {WARMUP_STEPS} warm-up steps; median step time'
  )
  report, all_pass = target_report(rows)
  parts = [header, '', *workload_lines(workloads), '']
  if rows:
    parts += [markdown(rows), '', LEGEND, '', 'Targets (on the medians):']
    parts += [report, '', 'Programs:', '', programs_markdown(rows), '']
    parts += [PROGRAMS_LEGEND]
  if compile_rows:
    parts += ['', 'Compile cost:', '', compile_markdown(compile_rows), '']
    parts += [cc.COMPILE_LEGEND, *compile_notes(compile_rows)]
  text = '\n'.join(parts)
  print(text)
  notes = [
    f'{r["model"]} {r["optimizer"]}: {r["note"]}' for r in rows if r['note']
  ]
  if notes:
    print('\nNotes:\n' + '\n'.join(notes))
  if skipped:
    text += '\n\nSkipped:\n' + '\n'.join(f'* {s}' for s in skipped)
    print('\nSkipped:\n' + '\n'.join(f'* {s}' for s in skipped))
  if not args.out_dir:
    return
  result = {
    'machine': machine(),
    'command': _command(args),
    'git_commit': cli.git_commit(),
    'rounds': args.rounds,
    'steps_per_round': args.steps_per_round,
    'warmup_steps': WARMUP_STEPS,
    'learning_rate': LEARNING_RATE,
    'workloads': workloads,
    'targets_pass': all_pass,
    'rows': rows,
    'compile_rows': compile_rows,
    'skipped': skipped,
    'kfac_jax': {
      'version': getattr(kfac.kfac_jax, '__version__', None),
      'eval_jaxpr_eqn_patched': kfac.PATCHED,
    },
  }
  suffix = f'_{args.tag}' if args.tag else ''
  _write(Path(args.out_dir), f'step_cost{suffix}', text, result)


if __name__ == '__main__':
  main()
