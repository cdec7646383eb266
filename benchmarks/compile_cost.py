"""Compile cost: trace+lower and XLA compile seconds of a training step's
programs, kernels, XLA's memory plan and the optimizer state, as ratios to
the first optimizer's step (Adam's), measured in one process with abstract
arguments (nothing allocated, nothing run). Used by
``python -m benchmarks.step_cost --compile-only``.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings

import jax
import numpy as np
from tqdm import tqdm

from benchmarks import optimizers as opt
from benchmarks import stats
from benchmarks.measure import (
  compile_seconds,
  compiled_memory,
  kernel_count,
  mb,
  tree_bytes,
)
from benchmarks.training import cross_entropy_loss, init_model, make_train_step
from benchmarks.workloads import Workload


def abstract_program(arm: opt.Arm, work: Workload, program: str, lr: float):
  """``(fresh jitted step, abstract arguments, abstract opt_state)``."""
  params, model_state = jax.eval_shape(lambda: init_model(work.model, work.x))
  tx = opt.make(arm, lr, layout=layout(arm, work, params))
  opt_state = jax.eval_shape(tx.init, params)
  step = make_train_step(work.model, tx, adafisher=arm.captures)
  args = (params, model_state, opt_state, work.x, work.y, program != 'plain')
  return step, args, opt_state


def layout(arm: opt.Arm, work: Workload, params):
  """AdaFisher's factor shapes (``curvature_layout``, as the README sizes
  the state; tied embeddings need it), ``None`` for other optimizers."""
  if not arm.captures:
    return None
  model_state = jax.eval_shape(lambda: init_model(work.model, work.x))[1]
  grad_fn = opt.curvature_grad(cross_entropy_loss(work.model))
  return opt.curvature_layout(grad_fn, params, model_state, work.x, work.y)


def layout_seconds(work: Workload) -> float:
  """Seconds of ``curvature_layout`` for the model (abstract parameters)."""
  params, model_state = jax.eval_shape(lambda: init_model(work.model, work.x))
  grad_fn = opt.curvature_grad(cross_entropy_loss(work.model))
  start = time.perf_counter()
  opt.curvature_layout(grad_fn, params, model_state, work.x, work.y)
  return time.perf_counter() - start


def compile_costs(
  model_name: str,
  arms: dict[str, opt.Arm],
  rounds: int,
  work: Workload,
  lr: float,
) -> list[dict]:
  """Trace+lower and compile seconds, kernels and memory of every program
  of ``arms`` (their first: the reference, Adam) on one model, in
  ``rounds`` interleaved rounds (a fresh program each time, the order
  shuffled per round), in this process."""
  keys = [(n, p) for n, arm in arms.items() for p in opt.programs(arm)]
  seconds = {key: [] for key in keys}
  last = {}
  rng = np.random.default_rng(0)
  for _ in tqdm(range(rounds), desc=f'{model_name}: compile', leave=False):
    for i in rng.permutation(len(keys)):
      name, program = keys[i]
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', opt.Unpreconditioned)
        warnings.simplefilter('always', opt.UnsupportedLayer)
        step, args, opt_state = abstract_program(arms[name], work, program, lr)
        timing, compiled = compile_seconds(step, *args)
      seconds[keys[i]].append(timing)
      notes = sorted({str(w.message) for w in caught})
      last[keys[i]] = (compiled, opt_state, ' '.join(notes))
  sizing = None
  if any(arm.captures for arm in arms.values()):
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', opt.UnsupportedLayer)
      sizing = layout_seconds(work)
  return _compile_rows(arms, model_name, keys, seconds, last, sizing)


def _compile_rows(arms, model_name, keys, seconds, last, sizing) -> list[dict]:
  base_key = keys[0]
  base_memory = compiled_memory(last[base_key][0]) if base_key in last else {}
  base_state = tree_bytes(last[base_key][1]) if base_key in last else math.nan
  rows = []
  for key in keys:
    name, program = key
    compiled, opt_state, note = last[key]
    memory = compiled_memory(compiled) or {}
    row = {
      'model': model_name,
      'optimizer': name,
      'label': arms[name].label,
      'program': program,
      'rounds': len(seconds[key]),
      'seconds': seconds[key],
      'kernels': kernel_count(compiled.as_text()),
      'compiled_memory': memory,
      'state_bytes': tree_bytes(opt_state),
      'state_vs_adam': tree_bytes(opt_state) / base_state,
      'peak_vs_adam': (
        memory.get('total', math.nan) / base_memory['total']
        if base_memory
        else math.nan
      ),
      'curvature_layout_seconds': sizing if arms[name].captures else None,
      'note': note,
    }
    for part in ('trace_lower', 'compile'):
      values = [s[part] for s in seconds[key]]
      row[f'{part}_seconds'] = statistics.median(values)
      if base_key in seconds:
        base = [s[part] for s in seconds[base_key]]
        row[f'{part}_vs_adam'] = stats.ratio(values, base)
    rows.append(row)
  return rows


def _ratio_cell(ratio: dict | None) -> str:
  if not ratio:
    return '-'
  low, high = ratio['ci']
  if math.isfinite(low):
    return f'{ratio["ratio"]:.2f} [{low:.2f}, {high:.2f}]'
  return f'{ratio["ratio"]:.2f}'


def compile_markdown(rows) -> str:
  """Per program: trace+lower and compile seconds and their ratios to
  Adam's step, kernels, XLA's memory plan and the state."""
  lines = [
    '| model | optimizer | program | trace+lower (s) | / Adam | compile (s) '
    '| / Adam | kernels | state (MB) | state / Adam | peak (MB) | '
    'peak / Adam |',
    '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in rows:
    memory = r['compiled_memory'] or {}
    lines.append(
      f'| {r["model"]} | {r["optimizer"]} | {r["program"]} | '
      f'{r["trace_lower_seconds"]:.2f} | '
      f'{_ratio_cell(r.get("trace_lower_vs_adam"))} | '
      f'{r["compile_seconds"]:.2f} | '
      f'{_ratio_cell(r.get("compile_vs_adam"))} | {r["kernels"]} | '
      f'{mb(r["state_bytes"])} | {r["state_vs_adam"]:.3f} | '
      f'{mb(memory.get("total"))} | {r["peak_vs_adam"]:.3f} |'
    )
  return '\n'.join(lines)


def compile_notes(rows) -> list[str]:
  """The layout seconds and the library's warnings, once per model."""
  lines, seen = [], set()
  for r in rows:
    if r['curvature_layout_seconds'] is not None and r['model'] not in seen:
      seen.add(r['model'])
      lines.append(
        f'* {r["model"]}: `curvature_layout` '
        f'{r["curvature_layout_seconds"]:.2f} s (once)'
      )
    if r['note'] and (r['model'], r['note']) not in seen:
      seen.add((r['model'], r['note']))
      lines.append(f'* {r["model"]}: warning: {r["note"]}')
  return [''] + lines if lines else []


COMPILE_LEGEND = (
  'trace+lower: `jit(step).trace(...).lower()` seconds; compile: '
  '`.compile()` (XLA) seconds; each the median over rounds, each round a '
  'freshly built program with abstract arguments, all programs of a model '
  'interleaved in a new random order per round, in one process; / Adam: '
  "the geometric mean over rounds of the ratio to Adam's step in the same "
  'round, [95% CI] with two rounds or more; peak: XLA memory analysis of '
  'the compiled program, argument + output - alias + temp (donated '
  'buffers counted once); state: bytes of the optimizer state.'
)
