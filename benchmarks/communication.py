"""Collective bytes AdaFisher adds to a data-parallel step, read from the HLO.

Compiles the same data-parallel train step (batch sharded over a mesh,
params replicated) for ``optax.adam`` and for AdaFisher's two programs (the
refresh step, which captures statistics, and the plain step, which does
not), sums the result bytes of every collective in the optimized HLO, and
reports what AdaFisher adds relative to the gradient all-reduce, per program
and amortised over the default ``t_cov`` (target: at most 1%), with step
times measured side by side (interleaved rounds, medians). Writes
``communication.json`` and ``communication.md`` to ``--out-dir``.

    python -m benchmarks.communication --devices 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

TARGET_PERCENT = 1.0  # AdaFisher's added collective bytes, % of Adam's
T_COV = 100  # the default (reference numerics): one refresh step in T_COV
AMORTISED = f'adafisher default (t_cov={T_COV}, amortised)'


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
  parser.add_argument(
    '--axis-type',
    choices=('auto', 'explicit'),
    default='auto',
    help="the mesh axis' type (explicit: sharding in the arrays' types; the "
    "GPT's nn.Embed lookup does not trace with an explicitly sharded batch)",
  )
  parser.add_argument(
    '--out-dir',
    type=Path,
    default=Path(__file__).resolve().parent / 'results',
    help='where communication.{json,md} go',
  )
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
  from benchmarks.measure import machine
  from benchmarks.training import init_model, make_train_step
  from benchmarks.workloads import WORKLOADS

  devices = jax.devices()[: args.devices]
  mesh = jax.make_mesh(
    (len(devices),),
    ('batch',),
    devices=devices,
    axis_types=(getattr(jax.sharding.AxisType, args.axis_type.capitalize()),),
  )
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P('batch'))
  header = (
    f'{len(devices)} {devices[0].platform} devices, batch sharded; '
    'collective bytes per step from the compiled HLO'
  )
  lines = [
    '| model | optimizer | collective bytes | added vs Adam | '
    'added / gradient all-reduce | step ms | time / Adam |',
    '|---|---|---:|---:|---:|---:|---:|',
  ]
  results = []
  print(header, *lines, sep='\n')
  for name in args.models.split(','):
    work = WORKLOADS[name]()
    model = work.model
    x = jax.device_put(work.x, batch)
    y = jax.device_put(work.y, batch)
    params, model_state = jax.device_put(
      init_model(model, work.x[:2]), replicated
    )
    rows = {}
    for label, tx, capture, refresh in (
      ('adam', optax.adam(1e-3), False, False),
      ('adafisher refresh step (= t_cov=1)', afo.adafisher(1e-3), True, True),
      ('adafisher plain step', afo.adafisher(1e-3), True, False),
    ):
      step = make_train_step(model, tx, adafisher=capture, donate=False)
      state = jax.device_put(tx.init(params), replicated)
      compiled = step.lower(
        params, model_state, state, x, y, refresh=refresh
      ).compile()
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
    refresh, plain = (rows[k] for k in list(rows)[1:])
    rows[AMORTISED] = {
      'bytes': (refresh['bytes'] + (T_COV - 1) * plain['bytes']) / T_COV,
      'kinds': {},
      'times': [
        (r + (T_COV - 1) * p) / T_COV
        for r, p in zip(refresh['times'], plain['times'])
      ],
    }
    for label, row in rows.items():
      added = row['bytes'] - base['bytes']
      median = statistics.median(row['times'])
      result = {
        'model': name,
        'optimizer': label,
        'collective_bytes': row['bytes'],
        'by_kind': row['kinds'],
        'added_bytes': added,
        'added_percent': 100 * added / max(base['bytes'], 1),
        'step_ms': 1e3 * median,
        'time_ratio': median / statistics.median(base['times']),
      }
      results.append(result)
      lines.append(
        f'| {name} | {label} | {row["bytes"]:,.0f} | {added:,.0f} | '
        f'{result["added_percent"]:.3f}% | {result["step_ms"]:.1f} | '
        f'{result["time_ratio"]:.3f} |'
      )
      print(lines[-1])
  worst = max(
    r['added_percent'] for r in results if r['optimizer'] == AMORTISED
  )
  verdict = (
    f'[{"PASS" if worst <= TARGET_PERCENT else "FAIL"}] largest addition '
    f'at the default t_cov={T_COV}, amortised: {worst:.3f}% of the gradient '
    f'collectives (target <= {TARGET_PERCENT}%); a refresh step adds the '
    'statistics once, a plain step nothing'
  )
  print(verdict)
  command = 'python -m benchmarks.communication ' + shlex.join(
    sys.argv[1:] if argv is None else argv
  )
  date = datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')
  args.out_dir.mkdir(parents=True, exist_ok=True)
  (args.out_dir / 'communication.json').write_text(
    json.dumps(
      {
        'date': date,
        'machine': machine(),
        'command': command.strip(),
        'devices': len(devices),
        'rounds': args.rounds,
        'results': results,
      },
      indent=2,
    )
  )
  (args.out_dir / 'communication.md').write_text(
    '\n'.join(
      [
        f'{date}; {machine()}; `{command.strip()}`',
        '',
        header,
        '',
        *lines,
        '',
        verdict,
        '',
      ]
    )
  )
  print(f'wrote {args.out_dir}/communication.{{json,md}}')


if __name__ == '__main__':
  main()
