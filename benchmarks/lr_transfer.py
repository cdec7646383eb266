"""Does Adam's learning rate carry over? A 7-point grid on the zoo's models.

Every optimizer trains every model of :mod:`benchmarks.zoo` for ``--steps``
steps at learning rates ``1e-3 * 2**k``, ``k = -3..3``, with the README's
two-program loop (statistics on refresh steps only). A run *trains* when
every loss is finite and the mean of its last 20 losses is below 80% of its
first loss; the table gives, per model and optimizer, the range of learning
rates that train and the final loss at 1e-3.

  python -m benchmarks.lr_transfer [--steps 200] [--problems mlp,vae]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import cli, zoo
from benchmarks import optimizers as opt

RESULTS = Path(__file__).parent / 'results'
RATES = [1e-3 * 2.0**k for k in range(-3, 4)]

#: The optimizers (their learning rate from the grid).
OPTIMIZERS = {
  'adam': opt.ADAM,
  'adafisher_like_adam': opt.LIKE_ADAM,
  'rms_reference': opt.arm(
    'rms_reference',
    "adafisherw grafting='rms'",
    'adafisher',
    alias='adafisherw',
    grafting='rms',
  ),
  'rms_paper_0.1': opt.arm(
    'rms_paper_0.1',
    "adafisherw grafting='rms', paper numerics, damping 0.1",
    'adafisher',
    alias='adafisherw',
    grafting='rms',
    numerics='paper',
    damping=0.1,
  ),
  'adam_graft_rel_0.1': opt.arm(
    'adam_graft_rel_0.1',
    "adafisherw grafting='adam', relative damping 0.1",
    'adafisher',
    alias='adafisherw',
    grafting='adam',
    relative_damping=0.1,
  ),
  'authors_default': opt.arm('authors_default', 'adafisher', 'adafisher'),
}


def train_linen(problem, arm, rates, steps, seed=0):
  """Losses ``[rate, step]`` of the README loop for each learning rate."""
  model = problem.make_model()
  batches = problem.batches(seed)
  x, y = next(batches)
  params0 = model.init(jax.random.key(seed), x)['params']
  loss_fn = problem.make_loss(model)
  grad_fn = opt.gradients(arm, loss_fn, has_aux=False)
  layout = (
    opt.curvature_layout(grad_fn, params0, x, y) if arm.captures else None
  )

  def build(lr):
    return opt.make(arm, lr, layout=layout)

  @functools.partial(jax.jit, static_argnames='refresh')
  def step(params, state, x, y, lr, refresh):
    loss, grads, curvature = grad_fn(params, x, y, capture=refresh)
    updates, state = opt.update(build(lr), grads, state, params, curvature)
    return optax.apply_updates(params, updates), state, loss

  losses = np.zeros((len(rates), steps))
  for i, lr in enumerate(rates):
    params, state = params0, build(lr).init(params0)
    schedule = opt.refresh_flags(arm, state)
    batches = problem.batches(seed)
    for t in range(steps):
      x, y = next(batches)
      params, state, loss = step(
        params, state, x, y, jnp.float32(lr), next(schedule)
      )
      losses[i, t] = float(loss)
  return losses


def train_nnx(problem, arm, rates, steps, seed=0):
  """As :func:`train_linen`, for an NNX model with ``nnx.Optimizer``."""
  grad_fn = opt.nnx_curvature_grad(
    lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(
      m(x), y
    ).mean()
  )
  losses = np.zeros((len(rates), steps))
  for i, lr in enumerate(rates):
    net = problem.make_model()
    optimizer = nnx.Optimizer(net, opt.make(arm, lr), wrt=nnx.Param)

    @nnx.jit(static_argnames='refresh')
    def step(net, optimizer, x, y, refresh):
      loss, grads, curvature = grad_fn(net, x, y, capture=refresh)
      if arm.captures:
        optimizer.update(net, grads, curvature=curvature)
      else:
        optimizer.update(net, grads)
      return loss

    schedule = opt.refresh_flags(arm, optimizer.opt_state)
    batches = problem.batches(seed)
    for t in range(steps):
      x, y = next(batches)
      losses[i, t] = float(step(net, optimizer, x, y, refresh=next(schedule)))
  return losses


def trains(losses: np.ndarray) -> bool:
  return bool(
    np.all(np.isfinite(losses)) and losses[-20:].mean() < 0.8 * losses[0]
  )


def _range(rates, ok) -> str:
  good = [r for r, o in zip(rates, ok) if o]
  return f'{min(good):.2g}-{max(good):.2g}' if good else 'none'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--steps', type=cli.positive_int, default=200)
  parser.add_argument(
    '--problems',
    type=cli.names_from(zoo.PROBLEMS),
    default=list(zoo.PROBLEMS),
  )
  parser.add_argument(
    '--optimizers',
    type=cli.names_from(OPTIMIZERS),
    default=list(OPTIMIZERS),
  )
  parser.add_argument('--out', default=str(RESULTS / 'lr_transfer.json'))
  args = parser.parse_args(argv)
  out = Path(args.out)
  results = json.loads(out.read_text()) if out.exists() else {}
  for problem_name in args.problems:
    problem = zoo.PROBLEMS[problem_name]
    for name in args.optimizers:
      train = train_nnx if problem.nnx else train_linen
      with warnings.catch_warnings():
        warnings.simplefilter('ignore', opt.Unpreconditioned)
        losses = train(problem, OPTIMIZERS[name], RATES, args.steps)
      ok = [trains(row) for row in losses]
      final = [float(row[-20:].mean()) for row in losses]
      results.setdefault(problem_name, {})[name] = dict(
        rates=RATES, trains=ok, final=final, first=float(losses[0, 0])
      )
      print(
        f'{problem_name:17s} {name:20s} trains at {_range(RATES, ok):13s} '
        f'loss at 1e-3 {final[3]:.4g} (first {losses[0, 0]:.4g})',
        flush=True,
      )
      out.parent.mkdir(exist_ok=True)
      out.write_text(json.dumps(results, indent=1, allow_nan=True))
  _table(results, out.with_suffix('.md'))


def _table(results, path: Path) -> None:
  names = [n for n in OPTIMIZERS if any(n in r for r in results.values())]
  lines = [
    '| model | ' + ' | '.join(names) + ' |',
    '|---|' + '---|' * len(names),
  ]
  for problem, by_opt in results.items():
    cells = []
    for n in names:
      r = by_opt.get(n)
      if r is None:
        cells.append('')
        continue
      f = r['final'][3]
      at = 'diverged' if not math.isfinite(f) else f'{f:.3g}'
      cells.append(f'{_range(r["rates"], r["trains"])} ({at})')
    lines.append(f'| {problem} | ' + ' | '.join(cells) + ' |')
  path.write_text(
    'Learning rates (of 1e-3 * 2**k, k=-3..3) at which each optimizer '
    'trains (loss finite, last-20 mean < 0.8 x first), and in brackets the '
    'final loss at 1e-3. `python -m benchmarks.lr_transfer`.\n\n'
    + '\n'.join(lines)
    + '\n'
  )


if __name__ == '__main__':
  main()
