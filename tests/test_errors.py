"""Malformed uses raise exceptions that name the parameter path or argument."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import adafisher_optax as afo

from models import MLP, batch, loss_fn


@pytest.fixture
def setup():
  model = MLP()
  x, y = batch(jax.random.key(0), (8, 5))
  params = model.init(jax.random.key(1), x)['params']
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model))
  _, grads, curvature = grad_fn(params, x, y)
  return model, params, grads, curvature, (x, y)


def test_update_without_curvature(setup):
  _, params, grads, _, _ = setup
  tx = afo.adafisher(1e-3)
  with pytest.raises(TypeError, match='`curvature`'):
    tx.update(grads, tx.init(params), params)


def test_curvature_from_another_model(setup):
  _, params, grads, _, (x, y) = setup
  other = MLP(widths=(16, 8, 4))
  other_params = other.init(jax.random.key(2), x)['params']
  _, _, other_curvature = afo.value_and_grad_with_curvature(loss_fn(other))(
    other_params, x, y
  )
  tx = afo.adafisher(1e-3)
  with pytest.raises(ValueError, match="layer 'dense2'"):
    tx.update(grads, tx.init(params), params, curvature=other_curvature)


def test_curvature_with_wrong_shapes(setup):
  _, params, grads, _, (x, y) = setup
  wide = MLP(widths=(16, 9))
  wide_params = wide.init(jax.random.key(2), x)['params']
  _, _, wide_curvature = afo.value_and_grad_with_curvature(loss_fn(wide))(
    wide_params, x, y
  )
  tx = afo.adafisher(1e-3)
  with pytest.raises(ValueError, match=r"Layer 'dense1'.*shapes"):
    tx.update(grads, tx.init(params), params, curvature=wide_curvature)


def test_curvature_that_is_not_statistics(setup):
  _, params, grads, _, _ = setup
  tx = afo.adafisher(1e-3)
  with pytest.raises(TypeError, match="'head/"):
    tx.update(grads, tx.init(params), params, curvature={'head': grads['head']})


@pytest.mark.parametrize(
  'argument,value',
  [
    ('damping', -1e-3),
    ('damping', 0.0),
    ('damping', float('nan')),
    ('b1', 1.0),
    ('b1', -0.1),
    ('gamma', 1.5),
    ('t_cov', 0),
    ('t_cov', 2.5),
    ('fisher_power', 0.0),
    ('weight_decay', -1.0),
  ],
)
def test_bad_hyperparameters(argument, value):
  with pytest.raises(ValueError, match=argument):
    afo.adafisher(1e-3, **{argument: value})


def test_bad_learning_rate():
  with pytest.raises(ValueError, match='learning_rate'):
    afo.adafisherw(-1.0)


def test_integer_params():
  params = {
    'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.zeros(2, jnp.int32)}
  }
  with pytest.raises(TypeError, match="'dense/bias'"):
    afo.adafisher(1e-3).init(params)


def test_misspelled_numerics():
  with pytest.raises(ValueError, match='numerics'):
    afo.adafisher(1e-3, numerics='refrence')
  with pytest.raises(ValueError, match='numerics'):
    afo.value_and_grad_with_curvature(lambda p: 0.0, numerics='papers')


def test_numerics_of_capture_and_optimizer_differ():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name='head')(nn.LayerNorm(name='ln')(x)).sum()

  model = Model()
  x = jnp.ones((3, 4))
  params = model.init(jax.random.key(0), x)['params']
  _, grads, curvature = afo.value_and_grad_with_curvature(
    lambda p, x: model.apply({'params': p}, x)
  )(params, x)
  tx = afo.adafisher(1e-3, numerics='paper')
  with pytest.raises(ValueError, match=r"curvature\['ln'\].*numerics='paper'"):
    tx.update(grads, tx.init(params), params, curvature=curvature)


def test_layers_argument_must_hold_supported_types():
  with pytest.raises(TypeError, match='layers'):
    afo.value_and_grad_with_curvature(lambda p: 0.0, layers=(nn.Dropout,))
  with pytest.raises(TypeError, match='layers'):
    afo.value_and_grad_with_curvature(lambda p: 0.0, layers=nn.Dense)


def test_params_argument_must_be_a_dict():
  grad_fn = afo.value_and_grad_with_curvature(lambda p: jnp.sum(p))
  with pytest.raises(TypeError, match='params'):
    grad_fn(jnp.ones(3))


def test_model_compiled_outside_the_capture(setup):
  model, params, _, _, (x, y) = setup
  apply = jax.jit(model.apply)
  apply({'params': params}, x)  # cached: the interception never runs

  def loss(p, x, y):
    logits = apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  with pytest.raises(afo.CaptureError, match='applied no Flax linen module'):
    afo.value_and_grad_with_curvature(loss)(params, x, y)


def test_loss_that_drops_the_probe(setup):
  model, params, _, _, (x, y) = setup

  def loss(p, x, y):
    p = {
      name: {k: v for k, v in layer.items() if k in ('kernel', 'bias')}
      for name, layer in p.items()
    }
    return loss_fn(model)(p, x, y)

  with pytest.raises(afo.CaptureError, match=r"Layer 'dense0'.*probe"):
    afo.value_and_grad_with_curvature(loss)(params, x, y)


def test_params_not_rooted_at_the_model(setup):
  model, params, _, _, (x, y) = setup

  def loss(p, x, y):
    return loss_fn(model)(p['model'], x, y)

  with pytest.raises(afo.CaptureError, match=r"Layer 'dense0'.*params"):
    afo.value_and_grad_with_curvature(loss)({'model': params}, x, y)


class _Cell(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(3, name='dense')(h)), None


def test_scan_stacking_params_on_another_axis():
  scan = nn.scan(
    _Cell, variable_axes={'params': 1}, split_rngs={'params': True}, length=2
  )()
  x = jnp.ones((4, 3))
  params = scan.init(jax.random.key(0), x, None)['params']
  grad_fn = afo.value_and_grad_with_curvature(
    lambda p, x: scan.apply({'params': p}, x, None)[0].sum()
  )
  with pytest.raises(afo.CaptureError, match=r"'dense'.*variable_axes"):
    grad_fn(params, x)


def test_scan_that_drops_the_probe():
  """A lifted transform that filters params loses statistics: an error."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      def weights_only(variables):
        return {
          'params': {
            layer: {n: v for n, v in d.items() if n in ('kernel', 'bias')}
            for layer, d in variables['params'].items()
          }
        }

      only_weights = nn.map_variables(
        _Cell, 'params', trans_in_fn=weights_only, init=True
      )
      return only_weights(name='cell')(x, None)[0].sum()

  model = Model()
  x = jnp.ones((4, 3))
  params = model.init(jax.random.key(0), x)['params']
  grad_fn = afo.value_and_grad_with_curvature(
    lambda p, x: model.apply({'params': p}, x)
  )
  with pytest.raises(afo.CaptureError, match=r"'cell/dense'.*probe"):
    grad_fn(params, x)
