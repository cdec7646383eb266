"""Malformed uses raise exceptions that name the parameter path or argument."""

import dataclasses

import chex
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


def test_update_with_the_state_of_another_optimizer(setup):
  _, params, grads, _, _ = setup
  tx = afo.adafisher(1e-3)
  with pytest.raises(TypeError, match='AdaFisherState'):
    tx.update(grads, optax.adam(1e-3).init(params), params)


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
  with pytest.raises(TypeError, match='numerics'):  # the optimizer's alone
    afo.value_and_grad_with_curvature(lambda p: 0.0, numerics='papers')


def test_state_of_the_other_numerics():
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
  reference, paper = afo.adafisher(1e-3), afo.adafisher(1e-3, numerics='paper')
  for tx in (reference, paper):  # one curvature serves both numerics
    tx.update(grads, tx.init(params), params, curvature=curvature)
  with pytest.raises(
    ValueError, match=r"'head'.*numerics='reference'.*'paper'"
  ):
    paper.update(grads, reference.init(params), params, curvature=curvature)


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

  with pytest.raises(afo.CaptureError, match='applied no registered layer'):
    afo.value_and_grad_with_curvature(loss)(params, x, y)


def test_loss_that_rebuilds_the_params_dict(setup):
  """The loss sees params as given; rebuilding the dicts keeps the arrays."""
  model, params, grads, curvature, (x, y) = setup

  def loss(p, x, y):
    p = {
      name: {k: v for k, v in layer.items() if k in ('kernel', 'bias')}
      for name, layer in p.items()
    }
    return loss_fn(model)(p, x, y)

  _, got_grads, got = afo.value_and_grad_with_curvature(loss)(params, x, y)
  chex.assert_trees_all_close((got_grads, got), (grads, curvature))


def test_params_not_rooted_at_the_model(setup):
  """A model applied to a sub-tree is captured at that sub-tree's paths."""
  model, params, _, curvature, (x, y) = setup

  def loss(p, x, y):
    return loss_fn(model)(p['model'], x, y)

  _, _, got = afo.value_and_grad_with_curvature(loss)({'model': params}, x, y)
  chex.assert_trees_all_close(got, {'model': curvature})


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


# --- issue 4 battery: the ecosystem pieces -----------------------------------


def test_complex_params():
  params = {'dense': {'kernel': jnp.ones((2, 2), jnp.complex64)}}
  with pytest.raises(TypeError, match="'dense/kernel'"):
    afo.adafisher(1e-3).init(params)


def test_curvature_with_integer_statistics(setup):
  _, params, grads, curvature, _ = setup
  bad = dict(curvature)
  bad['head'] = dataclasses.replace(
    curvature['head'],
    input_sums=(curvature['head'].input_sums[0].astype(jnp.int32),),
  )
  tx = afo.adafisher(1e-3)
  with pytest.raises(TypeError, match=r"curvature\['head'\].*int32"):
    tx.update(grads, tx.init(params), params, curvature=bad)


def test_gradients_of_another_dtype(setup):
  _, params, grads, curvature, _ = setup
  tx = afo.adafisher(1e-3)
  grads = jax.tree.map(lambda g: g.astype(jnp.int32), grads)
  with pytest.raises(TypeError, match="'dense0/bias'"):
    tx.update(grads, tx.init(params), params, curvature=curvature)


def test_fisher_key_required_and_refused(setup):
  model, params, _, _, (x, y) = setup
  sampled = afo.value_and_grad_with_curvature(loss_fn(model), fisher='sampled')
  with pytest.raises(TypeError, match='fisher_key'):
    sampled(params, x, y)
  empirical = afo.value_and_grad_with_curvature(loss_fn(model))
  with pytest.raises(TypeError, match='fisher_key'):
    empirical(params, x, y, fisher_key=jax.random.key(0))
  with pytest.raises(ValueError, match='fisher'):
    afo.value_and_grad_with_curvature(loss_fn(model), fisher='true')


def test_sampled_fisher_without_registered_loss(setup):
  model, params, _, _, (x, y) = setup
  sampled = afo.value_and_grad_with_curvature(loss_fn(model), fisher='sampled')
  with pytest.raises(afo.CaptureError, match='softmax_cross_entropy'):
    sampled(params, x, y, fisher_key=jax.random.key(0))


def test_tag_on_transformed_params_needs_a_name():
  params = {'fc': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}

  def loss(p, x):
    doubled = jax.tree.map(lambda v: 2 * v, p['fc'])
    return afo.tags.dense(x, doubled).sum()

  with pytest.raises(afo.CaptureError, match="name='path/to/layer'"):
    afo.value_and_grad_with_curvature(loss)(params, jnp.ones((4, 3)))


def test_multi_steps_needs_a_layout_and_matching_curvature(setup):
  model, params, grads, curvature, (x, y) = setup
  with pytest.raises(ValueError, match='layout='):
    afo.multi_steps(afo.adafisher(1e-3), 2, layout=None)
  layout = afo.curvature_layout(
    afo.value_and_grad_with_curvature(loss_fn(model)), params, x, y
  )
  tx = afo.multi_steps(afo.adafisher(1e-3), 2, layout=layout)
  state = tx.init(params)
  with pytest.raises(ValueError, match='does not match the layout'):
    tx.update(grads, state, params, curvature={'head': curvature['head']})
  with pytest.raises(TypeError, match='MultiStepsState'):
    tx.update(grads, afo.adafisher(1e-3).init(params), params)
  with pytest.raises(TypeError, match='multi_steps'):
    afo.adafisher(1e-3).update(grads, state, params)


def test_train_state_without_curvature_is_a_plain_step(setup):
  model, params, grads, _, _ = setup
  tx = afo.adafisher(1e-3)
  state = afo.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  updates, _ = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_equal(
    state.apply_gradients(grads=grads).params,
    optax.apply_updates(params, updates),
  )


def test_checkpoint_of_another_model(setup, tmp_path):
  import orbax.checkpoint as ocp

  _, params, _, _, (x, _) = setup
  tx = afo.adafisher(1e-3)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'ckpt', {'opt_state': tx.init(params)})
    checkpointer.wait_until_finished()
  wider = MLP(widths=(16, 9)).init(jax.random.key(2), x)['params']
  with pytest.raises(ValueError, match=r"'opt_state/1/factors/dense1/s'"):
    afo.checkpoint.restore(tmp_path / 'ckpt', {'opt_state': tx.init(wider)})
  deeper = MLP(widths=(16, 8, 4)).init(jax.random.key(2), x)['params']
  with pytest.raises(ValueError, match=r"no entry 'opt_state/1/factors/dense2"):
    afo.checkpoint.restore(tmp_path / 'ckpt', {'opt_state': tx.init(deeper)})
  restored = afo.checkpoint.restore(
    tmp_path / 'ckpt', {'opt_state': tx.init(params)}
  )
  assert int(afo.adafisher_state(restored['opt_state']).count) == 0


def test_diagnostics_of_a_state_without_adafisher(setup):
  _, params, _, _, _ = setup
  with pytest.raises(ValueError, match='AdaFisherState'):
    afo.diagnostics(optax.adam(1e-3).init(params), params)


def test_state_shardings_need_named_shardings(setup):
  _, params, _, _, _ = setup
  with pytest.raises(TypeError, match='params_shardings'):
    afo.state_shardings(
      afo.adafisher(1e-3), params, jax.tree.map(lambda _: None, params)
    )


def test_sampled_fisher_without_the_library_loss(setup):
  model, params, _, _, (x, y) = setup
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model), fisher='sampled')
  with pytest.raises(afo.CaptureError, match=r'`fun`.*exactly once'):
    grad_fn(params, x, y, fisher_key=jax.random.key(0))
