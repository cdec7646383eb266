"""Measurement helpers shared by the benchmarks (no optimizer, no model).

* :func:`interleaved_rounds`: wall-clock and process-CPU seconds of several
  calls timed in interleaved rounds (A, B, C, A, B, C, ...), so that their
  ratios hold on a noisy shared machine;
* :func:`compile_seconds`: trace, lower and XLA-compile seconds of one
  jitted program, and the compiled program;
* :func:`kernel_count`, :func:`bytes_accessed`, :func:`compiled_memory`:
  what the compiled HLO launches, moves and holds;
* :func:`tree_bytes`, :func:`device_peak_bytes`: state bytes and the
  device's peak;
* :func:`machine`: one line about the machine (:func:`benchmarks.cli.machine_line`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from benchmarks import cli

NOT_KERNELS = (
  'parameter',
  'constant',
  'get-tuple-element',
  'tuple',
  'bitcast',
  'after-all',
)


def machine() -> str:
  """One line about the machine (:func:`benchmarks.cli.machine_line`)."""
  return cli.machine_line()


def tree_bytes(tree) -> int:
  """Bytes of the arrays (or ``jax.ShapeDtypeStruct``) of ``tree``; PRNG keys
  are not counted."""
  total = 0
  for x in jax.tree.leaves(tree):
    if not hasattr(x, 'dtype') or jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key
    ):
      continue
    total += math.prod(x.shape) * np.dtype(x.dtype).itemsize
  return total


def mb(value) -> str:
  """Bytes as MiB for a table (``-`` for ``None``)."""
  return '-' if value is None else f'{value / 2**20:.1f}'


def compiled_memory(compiled) -> dict[str, int] | None:
  """XLA's memory analysis of a compiled program (``None`` if unavailable):
  ``argument``, ``output``, ``alias``, ``temp`` bytes and ``total =
  argument + output - alias + temp`` (donated buffers counted once)."""
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
  """``peak_bytes_in_use`` of the first device (``None`` on CPU)."""
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


def compile_seconds(jitted, *args, **kwargs) -> tuple[dict[str, float], Any]:
  """Times ``jitted.trace(*args, **kwargs)``, ``.lower()`` and
  ``.compile()``; ``args`` may be ``jax.ShapeDtypeStruct``.

  Returns ``({'trace': s, 'lower': s, 'trace_lower': s, 'compile': s},
  compiled)``. Pass a freshly built ``jax.jit`` function for each
  measurement: JAX caches the trace of a function it has seen.
  """
  start = time.perf_counter()
  traced = jitted.trace(*args, **kwargs)
  traced_at = time.perf_counter()
  lowered = traced.lower()
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  seconds = {
    'trace': traced_at - start,
    'lower': lowered_at - traced_at,
    'trace_lower': lowered_at - start,
    'compile': done - lowered_at,
  }
  return seconds, compiled


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
