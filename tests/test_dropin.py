"""The README's first example, unchanged but for the model, trains at its
printed learning rate on the model families users bring (benchmarks.zoo):
the loss falls, nothing is non-finite, every supported layer is
preconditioned."""

import re
import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from test_docs import snippets

import adafisher_optax as afo
from benchmarks import zoo

STEPS = 40
LINEN = [name for name, p in zoo.PROBLEMS.items() if not p.nnx]
LOSS = re.compile(r'^def loss_fn\(.*?\n\n\n', re.S | re.M)


def _readme_example() -> str:
  return snippets('README.md')[0]


def test_the_readme_example_uses_adams_learning_rate():
  assert 'afo.adafisher_like_adam(1e-3' in _readme_example()
  assert LOSS.search(_readme_example())


@pytest.mark.parametrize('name', LINEN)
def test_readme_example_trains(name):
  problem = zoo.PROBLEMS[name]
  batches = problem.batches(0)
  x, y = next(batches)
  code = _readme_example()
  namespace = {
    'MyFlaxModel': problem.make_model,
    'x': x,
    'y': y,
    'batches': [next(batches) for _ in range(STEPS)],
  }
  if problem.make_loss is not zoo.cross_entropy_loss:  # the model's own loss
    code = LOSS.sub('loss_fn = make_loss(model)\n\n\n', code)
    namespace['make_loss'] = problem.make_loss
  with warnings.catch_warnings():
    warnings.simplefilter('error', afo.UnpreconditionedParametersWarning)
    warnings.simplefilter('error', afo.UnsupportedLayerWarning)
    exec(code, namespace)
    params, opt_state = namespace['params'], namespace['opt_state']
    first = namespace['loss_fn'](
      namespace['model'].init(jax.random.key(0), x)['params'], x, y
    )
  final = namespace['loss_fn'](params, x, y)
  assert np.isfinite(float(final)) and float(final) < 0.9 * float(first)
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(params))
  report = afo.diagnostics(opt_state, params)
  assert report.unpreconditioned == []
  assert all(layer.refreshes > 0 for layer in report.layers.values())


def test_nnx_model_trains_at_adams_learning_rate():
  problem = zoo.PROBLEMS['nnx_mlp']
  batches = problem.batches(0)
  net = problem.make_model()
  optimizer = nnx.Optimizer(net, afo.adafisher_like_adam(1e-3), wrt=nnx.Param)

  def loss(m, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  grad_fn = afo.nnx.value_and_grad_with_curvature(loss)

  @nnx.jit(static_argnames='refresh')
  def step(net, optimizer, x, y, refresh):
    value, grads, curvature = grad_fn(net, x, y, capture=refresh)
    optimizer.update(net, grads, curvature=curvature)
    return value

  x, y = next(batches)
  first = float(loss(net, x, y))
  schedule = afo.refresh_schedule(optimizer.opt_state)
  with warnings.catch_warnings():
    warnings.simplefilter('error', afo.UnpreconditionedParametersWarning)
    for _ in range(STEPS):
      step(net, optimizer, *next(batches), refresh=next(schedule))
  assert float(loss(net, x, y)) < 0.9 * first
  report = afo.diagnostics(optimizer.opt_state, nnx.state(net, nnx.Param))
  assert report.unpreconditioned == []


@pytest.mark.parametrize('alias', [afo.adafisher_like_adam, afo.adafisher])
def test_an_update_without_params_as_optax_adams(alias):
  """optax.adam's update takes no params; neither does AdaFisher's without
  weight decay. With weight decay it needs them, as optax.adamw's."""
  params = {'w': jax.numpy.ones((3, 2)), 'b': jax.numpy.zeros(2)}
  grads = jax.tree.map(lambda p: p + 0.5, params)
  tx = alias(1e-3)
  state = tx.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', afo.UnpreconditionedParametersWarning)
    without, _ = tx.update(grads, state)
    with_params, _ = tx.update(grads, state, params)
    np.testing.assert_array_equal(without['w'], with_params['w'])
    decayed = alias(1e-3, weight_decay=1e-2)
    with pytest.raises(ValueError, match='current value of parameters'):
      decayed.update(grads, decayed.init(params))
