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

import adafisher_optax as afo
from benchmarks import zoo

RESULTS = Path(__file__).parent / 'results'
RATES = [1e-3 * 2.0**k for k in range(-3, 4)]

#: Optimizers as functions of a (possibly traced) learning rate.
OPTIMIZERS = {
  'adam': optax.adam,
  'adafisher_like_adam': afo.adafisher_like_adam,
  'rms_reference': functools.partial(afo.adafisherw, grafting='rms'),
  'rms_paper_0.1': functools.partial(
    afo.adafisherw, grafting='rms', numerics='paper', damping=0.1
  ),
  'adam_graft_rel_0.1': functools.partial(
    afo.adafisherw, grafting='adam', relative_damping=0.1
  ),
  'authors_default': afo.adafisher,
}


def train_linen(problem, make_tx, rates, steps, seed=0):
  """Losses ``[rate, step]`` of the README loop for each learning rate."""
  model = problem.make_model()
  batches = problem.batches(seed)
  x, y = next(batches)
  params0 = model.init(jax.random.key(seed), x)['params']
  loss_fn = problem.make_loss(model)
  grad_fn = afo.value_and_grad_with_curvature(loss_fn)
  layout = afo.curvature_layout(grad_fn, params0, x, y)
  adafisher = make_tx is not optax.adam

  def build(lr):
    return make_tx(lr, layout=layout) if adafisher else make_tx(lr)

  @functools.partial(jax.jit, static_argnames='refresh')
  def step(params, state, x, y, lr, refresh):
    loss, grads, curvature = grad_fn(params, x, y, capture=refresh)
    tx = build(lr)
    if adafisher:
      updates, state = tx.update(grads, state, params, curvature=curvature)
    else:
      updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = np.zeros((len(rates), steps))
  for i, lr in enumerate(rates):
    params, state = params0, build(lr).init(params0)
    schedule = afo.refresh_schedule(state) if adafisher else None
    batches = problem.batches(seed)
    for t in range(steps):
      x, y = next(batches)
      refresh = next(schedule) if schedule else False
      params, state, loss = step(params, state, x, y, jnp.float32(lr), refresh)
      losses[i, t] = float(loss)
  return losses


def train_nnx(problem, make_tx, rates, steps, seed=0):
  """As :func:`train_linen`, for an NNX model with ``nnx.Optimizer``."""
  grad_fn = afo.nnx.value_and_grad_with_curvature(
    lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(
      m(x), y
    ).mean()
  )
  adafisher = make_tx is not optax.adam
  losses = np.zeros((len(rates), steps))
  for i, lr in enumerate(rates):
    net = problem.make_model()
    optimizer = nnx.Optimizer(net, make_tx(lr), wrt=nnx.Param)

    @nnx.jit(static_argnames='refresh')
    def step(net, optimizer, x, y, refresh):
      loss, grads, curvature = grad_fn(net, x, y, capture=refresh)
      if adafisher:
        optimizer.update(net, grads, curvature=curvature)
      else:
        optimizer.update(net, grads)
      return loss

    schedule = afo.refresh_schedule(optimizer.opt_state) if adafisher else None
    batches = problem.batches(seed)
    for t in range(steps):
      x, y = next(batches)
      refresh = next(schedule) if schedule else False
      losses[i, t] = float(step(net, optimizer, x, y, refresh=refresh))
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
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--problems', default=','.join(zoo.PROBLEMS))
  parser.add_argument('--optimizers', default=','.join(OPTIMIZERS))
  parser.add_argument('--out', default=str(RESULTS / 'lr_transfer.json'))
  args = parser.parse_args(argv)
  out = Path(args.out)
  results = json.loads(out.read_text()) if out.exists() else {}
  for problem_name in args.problems.split(','):
    problem = zoo.PROBLEMS[problem_name]
    for name in args.optimizers.split(','):
      train = train_nnx if problem.nnx else train_linen
      with warnings.catch_warnings():
        warnings.simplefilter('ignore', afo.UnpreconditionedParametersWarning)
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
