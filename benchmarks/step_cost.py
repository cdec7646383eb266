"""Per-step time and optimizer-state bytes: AdaFisher vs optax.adam.

Every optimizer trains the same model on the same batch in one process; steps
are timed in interleaved rounds (A, B, C, A, B, C, ...) and the medians
compared, so the ratios hold on a noisy shared machine.

    python -m benchmarks.step_cost --rounds 20
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

import adafisher_optax as afo
from benchmarks.models import MLP, ResNet
from benchmarks.training import init_model, make_train_step

MODELS = {
  'mlp': (lambda: MLP(), (256, 28, 28, 1)),
  'cnn': (lambda: ResNet(), (128, 28, 28, 1)),
}


def optimizers():
  """``name -> (transform, uses AdaFisher capture)``."""
  return {
    'adam': (optax.adam(1e-3), False),
    'adafisher t_cov=1': (afo.adafisher(1e-3, t_cov=1), True),
    'adafisher default': (afo.adafisher(1e-3), True),
  }


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(model_name: str, rounds: int, steps_per_round: int):
  make_model, shape = MODELS[model_name]
  model = make_model()
  key = jax.random.key(0)
  x = jax.random.normal(key, shape)
  y = jax.random.randint(key, shape[:1], 0, 10)
  params, model_state = init_model(model, x)
  runs = {}
  for name, (tx, capture) in optimizers().items():
    step = make_train_step(model, tx, adafisher=capture)
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    state = [copy(params), copy(model_state), tx.init(params)]
    runs[name] = {
      'step': step,
      'state': state,
      'times': [],
      'state_bytes': tree_bytes(state[2]),
    }

  def advance(run, n):
    p, ms, os_ = run['state']
    for _ in range(n):
      p, ms, os_, loss = run['step'](p, ms, os_, x, y)
    jax.block_until_ready(loss)
    run['state'] = [p, ms, os_]

  for run in runs.values():  # compile and warm up
    advance(run, 3)
  for _ in tqdm(range(rounds), desc=model_name, leave=False):
    for run in runs.values():
      start = time.perf_counter()
      advance(run, steps_per_round)
      run['times'].append((time.perf_counter() - start) / steps_per_round)
  base = runs['adam']
  base_time = statistics.median(base['times'])
  rows = []
  for name, run in runs.items():
    median = statistics.median(run['times'])
    rows.append(
      {
        'model': model_name,
        'optimizer': name,
        'step_ms': 1e3 * median,
        'time_vs_adam': median / base_time,
        'state_bytes': run['state_bytes'],
        'state_vs_adam': run['state_bytes'] / base['state_bytes'],
      }
    )
  return rows


def markdown(rows) -> str:
  lines = [
    '| model | optimizer | step (ms) | time / Adam | state (MB) | state / Adam |',
    '|---|---|---:|---:|---:|---:|',
  ]
  for r in rows:
    lines.append(
      f'| {r["model"]} | {r["optimizer"]} | {r["step_ms"]:.2f} | '
      f'{r["time_vs_adam"]:.3f} | {r["state_bytes"] / 2**20:.2f} | '
      f'{r["state_vs_adam"]:.3f} |'
    )
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='mlp,cnn')
  parser.add_argument('--rounds', type=int, default=20)
  parser.add_argument('--steps-per-round', type=int, default=5)
  parser.add_argument('--json', help='write the rows to this JSON file')
  args = parser.parse_args(argv)
  rows = []
  for model_name in args.models.split(','):
    rows += measure(model_name, args.rounds, args.steps_per_round)
  device = jax.devices()[0]
  header = (
    f'{device.platform}: {device.device_kind}, {platform.processor() or platform.machine()}, '
    f'jax {jax.__version__}, rounds={args.rounds}'
  )
  print(header)
  print(markdown(rows))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'machine': header, 'rows': rows}, f, indent=2)


if __name__ == '__main__':
  main()
