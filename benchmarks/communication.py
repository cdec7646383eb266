"""Collective bytes AdaFisher adds to a data-parallel step, read from the HLO.

Compiles the same data-parallel train step (batch sharded over a mesh,
params replicated) for ``optax.adam`` and for AdaFisher, sums the result bytes
of every collective in the optimized HLO, and reports what AdaFisher adds
relative to the gradient all-reduce (target: at most 1%), with step times
measured side by side.

    python -m benchmarks.communication --devices 8
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time


def _collectives(hlo: str) -> dict[str, int]:
  """Result bytes of each kind of collective in compiled HLO text."""
  sizes = {
    'pred': 1,
    's8': 1,
    'u8': 1,
    'bf16': 2,
    'f16': 2,
    's16': 2,
    'u16': 2,
    'f32': 4,
    's32': 4,
    'u32': 4,
    'f64': 8,
    's64': 8,
    'u64': 8,
  }
  kinds = 'all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all'
  pattern = re.compile(
    rf'= (\(.*?\)|[a-z0-9]+\[[\d,]*\]\S*) ({kinds})(-start)?\('
  )
  totals: dict[str, int] = {}
  for line in hlo.splitlines():
    match = pattern.search(line)
    if not match:
      continue
    nbytes = 0
    for dtype, dims in re.findall(r'([a-z0-9]+)\[([\d,]*)\]', match.group(1)):
      count = 1
      for d in filter(None, dims.split(',')):
        count *= int(d)
      nbytes += count * sizes.get(dtype, 4)
    totals[match.group(2)] = totals.get(match.group(2), 0) + nbytes
  return totals


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--devices',
    type=int,
    default=8,
    help='virtual CPU devices when no accelerator mesh',
  )
  parser.add_argument('--models', default='mlp,cnn,gpt')
  parser.add_argument('--rounds', type=int, default=5)
  args = parser.parse_args(argv)
  if 'jax' not in sys.modules:
    os.environ.setdefault(
      'XLA_FLAGS', f'--xla_force_host_platform_device_count={args.devices}'
    )
  import jax
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import adafisher_optax as afo
  from benchmarks.step_cost import WORKLOADS
  from benchmarks.training import init_model, make_train_step

  devices = jax.devices()[: args.devices]
  mesh = jax.make_mesh((len(devices),), ('batch',), devices=devices)
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P('batch'))
  print(
    f'{len(devices)} {devices[0].platform} devices, batch sharded; '
    'collective bytes per step from the compiled HLO'
  )
  print(
    '| model | optimizer | collective bytes | added vs Adam | '
    'added / gradient all-reduce | step ms | time / Adam |'
  )
  print('|---|---|---:|---:|---:|---:|---:|')
  for name in args.models.split(','):
    work = WORKLOADS[name]()
    model = work.model
    x = jax.device_put(work.x, batch)
    y = jax.device_put(work.y, batch)
    params, model_state = jax.device_put(
      init_model(model, work.x[:2]), replicated
    )
    rows = {}
    for label, tx, capture in (
      ('adam', optax.adam(1e-3), False),
      ('adafisher t_cov=1', afo.adafisher(1e-3, t_cov=1), True),
      ('adafisher default', afo.adafisher(1e-3), True),
    ):
      step = make_train_step(model, tx, adafisher=capture, donate=False)
      state = jax.device_put(tx.init(params), replicated)
      compiled = step.lower(params, model_state, state, x, y).compile()
      totals = _collectives(compiled.as_text())
      out = compiled(params, model_state, state, x, y)
      jax.block_until_ready(out)
      rows[label] = {
        'bytes': sum(totals.values()),
        'kinds': totals,
        'run': (compiled, state),
        'times': [],
      }
    for _ in range(args.rounds):
      for row in rows.values():
        compiled, state = row['run']
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, model_state, state, x, y))
        row['times'].append(time.perf_counter() - start)
    base = rows['adam']
    for label, row in rows.items():
      added = row['bytes'] - base['bytes']
      median = statistics.median(row['times'])
      print(
        f'| {name} | {label} | {row["bytes"]:,} | {added:,} | '
        f'{100 * added / max(base["bytes"], 1):.3f}% | {1e3 * median:.1f} | '
        f'{median / statistics.median(base["times"]):.3f} |'
      )


if __name__ == '__main__':
  main()
