"""FSDP at GPT-2 size on 8 virtual CPU devices (issue 17, item 3).

The GPT-2-small workload (12 blocks, d_model 768, vocab 50257, tied
embeddings) with its params sharded FSDP-style (every leaf of 8k entries or
more split along its largest axis that divides by 8) and the optimizer
state from ``state_shardings``: per-device state bytes against the whole,
for Adam and AdaFisher, and the README's two-program loop run for a few
steps to show each program compiles once (``refresh`` and ``plain``). The
equality "D devices x B == 1 device x D*B" is a float64 test
(``tests/test_distributed.py::test_fsdp_sharded_params_and_state``).

    python -m benchmarks.fsdp_scale [--layers 12] [--steps 4]
"""

from __future__ import annotations

import os

DEVICES = 8
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '')
  + f' --xla_force_host_platform_device_count={DEVICES}'
)

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import cli, measure, workloads  # noqa: E402
from benchmarks import optimizers as opt  # noqa: E402
from benchmarks.training import cross_entropy_loss  # noqa: E402

RESULTS = Path(__file__).parent / 'results'
ARMS = (opt.ADAM, opt.LIKE_ADAM, opt.REF)


def fsdp_shardings(mesh, params):
  """FSDP: every leaf of 8k entries or more split along its largest axis
  that divides by the device count (the tied embedding along d_model), the
  rest replicated."""

  def spec(leaf):
    axes = [a for a in range(leaf.ndim) if leaf.shape[a] % DEVICES == 0]
    if leaf.size < 8192 or not axes:
      return NamedSharding(mesh, P())
    axis = max(axes, key=lambda a: leaf.shape[a])
    return NamedSharding(mesh, P(*[None] * axis, 'fsdp'))

  return jax.tree.map(spec, params)


def bytes_per_device(tree, shardings) -> tuple[int, int]:
  """``(whole, one device's share)`` in bytes."""
  whole = local = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    size = np.dtype(leaf.dtype).itemsize
    whole += size * int(np.prod(leaf.shape))
    local += size * int(np.prod(sharding.shard_shape(leaf.shape)))
  return whole, local


def run_arm(arm, work, mesh, steps: int) -> dict:
  """State bytes, then ``steps`` steps of the two-program loop."""
  model = work.model
  params_abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), work.x[:1])['params']
  )
  params_shardings = fsdp_shardings(mesh, params_abstract)
  loss = cross_entropy_loss(model)

  def plain_loss(params, x, y):
    return loss(params, {}, x, y)[0]

  grad_fn = opt.gradients(arm, plain_loss, has_aux=False)
  kwargs = {}
  if arm.captures:
    kwargs['layout'] = opt.curvature_layout(
      grad_fn, params_abstract, work.x, work.y
    )
  tx = opt.make(arm, 1e-4, **kwargs)
  shardings = opt.state_shardings(tx, params_abstract, params_shardings)
  whole, local = bytes_per_device(
    jax.eval_shape(tx.init, params_abstract), shardings
  )

  params = jax.jit(
    lambda key: model.init(key, work.x[:1])['params'],
    out_shardings=params_shardings,
  )(jax.random.key(0))
  state = jax.jit(tx.init, out_shardings=shardings)(params)

  @functools.partial(
    jax.jit,
    static_argnames='capture',
    donate_argnums=(0, 1),
    out_shardings=(params_shardings, shardings, None),
  )
  def step(params, state, x, y, capture):
    value, grads, curvature = grad_fn(params, x, y, capture=capture)
    updates, state = opt.update(tx, grads, state, params, curvature)
    return optax.apply_updates(params, updates), state, value

  batch = NamedSharding(mesh, P('fsdp'))
  x, y = jax.device_put(work.x, batch), jax.device_put(work.y, batch)
  flags, seconds, losses = opt.refresh_flags(arm, state), [], []
  for _ in range(steps):
    start = time.perf_counter()
    params, state, value = step(params, state, x, y, next(flags))
    losses.append(float(value))
    seconds.append(time.perf_counter() - start)
  return {
    'state_bytes': whole,
    'state_bytes_per_device': local,
    'share': local / whole,
    'compiled_programs': step._cache_size(),
    'programs': opt.programs(arm),
    'first_step_s': seconds[0],
    'later_step_s': float(np.median(seconds[1:])) if steps > 1 else None,
    'losses': losses,
  }


def table(results: dict, description: str) -> str:
  lines = [
    f'{description}; params and batch sharded over {DEVICES} virtual CPU '
    f'devices (FSDP); `python -m benchmarks.fsdp_scale`.',
    '',
    '| optimizer | state (MB) | per device (MB) | share | compiled programs '
    '| first step (s) | losses |',
    '|---|---:|---:|---:|---|---:|---|',
  ]
  for name, r in results.items():
    losses = ', '.join(f'{v:.3f}' for v in r['losses'])
    lines.append(
      f'| {name} | {measure.mb(r["state_bytes"])} | '
      f'{measure.mb(r["state_bytes_per_device"])} | 1/{1 / r["share"]:.2f} | '
      f'{r["compiled_programs"]} ({", ".join(r["programs"])}) | '
      f'{r["first_step_s"]:.1f} | {losses} |'
    )
  lines += [
    '',
    "share: one device's bytes of the whole state (AdaFisher's factor "
    'vectors are replicated: a few KiB per layer); compiled programs: '
    "entries in the jitted step's cache after the run (one per program); "
    'first step: compile and run.',
  ]
  return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', type=cli.positive_int, default=12)
  parser.add_argument('--steps', type=cli.positive_int, default=4)
  parser.add_argument(
    '--batch', type=cli.positive_int, default=DEVICES,
    help=f'a multiple of the {DEVICES} devices',
  )  # fmt: skip
  parser.add_argument('--seq', type=cli.positive_int, default=128)
  parser.add_argument('--out-dir', type=Path, default=RESULTS)
  args = parser.parse_args(argv)
  if args.batch % DEVICES:
    parser.error(f'--batch must be a multiple of the {DEVICES} devices')
  assert jax.device_count() == DEVICES, jax.devices()
  work = workloads.gpt2_workload(args.layers, batch=args.batch, seq=args.seq)
  mesh = jax.make_mesh(
    (DEVICES,), ('fsdp',), axis_types=(jax.sharding.AxisType.Auto,)
  )
  results = {}
  for arm in ARMS:
    results[arm.name] = run_arm(arm, work, mesh, args.steps)
    print(arm.name, json.dumps(results[arm.name]), flush=True)
  args.out_dir.mkdir(parents=True, exist_ok=True)
  record = {
    'machine': measure.machine(),
    'description': work.description,
    'results': results,
  }
  (args.out_dir / 'fsdp_scale.json').write_text(json.dumps(record, indent=1))
  text = table(results, work.description)
  (args.out_dir / 'fsdp_scale.md').write_text(text)
  print(text)


if __name__ == '__main__':
  main()
