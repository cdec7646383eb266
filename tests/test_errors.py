"""Malformed uses raise exceptions that name the parameter path or argument."""

import dataclasses
import inspect
import warnings

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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
  # Its 'dense2' is a layer these params lack (left out, as for an optimizer
  # of a sub-tree); its 'head' reads 4 inputs where this one reads 8.
  with pytest.raises(ValueError, match=r"Layer 'head'.*shapes"):
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


def _one_step_of_a_small_model():
  """``(params, grads, curvature)`` of a LayerNorm + Dense model."""

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
  return params, grads, curvature


def test_state_of_the_other_numerics():
  params, grads, curvature = _one_step_of_a_small_model()
  reference, paper = afo.adafisher(1e-3), afo.adafisher(1e-3, numerics='paper')
  for tx in (reference, paper):  # one curvature serves both numerics
    tx.update(grads, tx.init(params), params, curvature=curvature)
  with pytest.raises(ValueError, match=r"numerics='reference'.*'paper'"):
    paper.update(grads, reference.init(params), params, curvature=curvature)


@pytest.mark.parametrize('held, wanted', [(None, 'adam'), ('adam', 'rms')])
def test_state_of_another_grafting_names_grafting(held, wanted):
  params, grads, curvature = _one_step_of_a_small_model()
  state = afo.adafisher(1e-3, grafting=held).init(params)
  with pytest.raises(ValueError, match=f'made with grafting={held!r}'):
    afo.adafisher(1e-3, grafting=wanted).update(
      grads, state, params, curvature=curvature
    )


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
  with pytest.warns(afo.UnsupportedLayerWarning, match=r'dense.*variable_axes'):
    _, _, curvature = grad_fn(params, x)
  assert curvature == {}


def test_layer_whose_params_map_variables_reshapes_is_reported_alone():
  """A kernel stored flat and reshaped by nn.map_variables: that layer gets
  F~ = 1 with a warning naming it; the rest of the model is captured."""

  def reshaped(source, target):
    return lambda v: jax.tree.map(
      lambda a: a.reshape(target) if a.shape == source else a, v
    )

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      flat_dense = nn.map_variables(
        nn.Dense, 'params', trans_in_fn=reshaped((40,), (5, 8)),
        trans_out_fn=reshaped((5, 8), (40,)), init=True,
      )  # fmt: skip
      h = jnp.tanh(flat_dense(8, name='flat')(x))
      return nn.Dense(3, name='head')(h)

  model = Model()
  x = jax.random.normal(jax.random.key(1), (16, 5))
  y = jnp.arange(16) % 3
  params = model.init(jax.random.key(0), x)['params']
  assert params['flat']['kernel'].shape == (40,)

  def loss(p, x, y):
    logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grad_fn = afo.value_and_grad_with_curvature(loss)
  with pytest.warns(afo.UnsupportedLayerWarning, match=r'flat \(Dense.*map_v'):
    value, grads, curvature = grad_fn(params, x, y)
    layout = afo.curvature_layout(grad_fn, params, x, y)
  assert sorted(curvature) == ['head']
  chex.assert_trees_all_close(grads, jax.grad(loss)(params, x, y))
  tx = afo.adafisher_like_adam(1e-3, layout=layout)
  state = tx.init(params)
  assert set(afo.adafisher_state(state).factors) == {'head'}
  with pytest.warns(afo.UnpreconditionedParametersWarning, match='flat/kernel'):
    updates, _ = tx.update(grads, state, params, curvature=curvature)
  assert all(jnp.isfinite(u).all() for u in jax.tree.leaves(updates))
  assert jnp.isfinite(value)


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
  for not_a_key in (0, jnp.ones(2), jnp.zeros(3, jnp.uint32)):
    with pytest.raises(TypeError, match='fisher_key must be a jax random key'):
      sampled(params, x, y, fisher_key=not_a_key)
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
  other_t_cov = afo.multi_steps(afo.adafisher(1e-3, t_cov=3), 2, layout=layout)
  with pytest.raises(ValueError, match=r'other settings .* tx\.init'):
    other_t_cov.update(grads, state, params, curvature=curvature)


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
  with pytest.raises(ValueError, match=r"'opt_state/1/factors/dense1/vectors'"):
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


def test_host_functions_refuse_a_replicated_state(setup):
  """A ``jax.pmap`` state (a leading device axis) is named, with the fix."""
  _, params, _, _, _ = setup
  state = afo.adafisher(1e-3).init(params)
  replicated = jax.tree.map(lambda x: jnp.stack([x, x]), state)
  stacked = jax.tree.map(lambda x: jnp.stack([x, x]), params)
  with pytest.raises(
    ValueError, match=r'refresh_schedule: .* leading axis of 2'
  ):
    afo.refresh_schedule(replicated)
  with pytest.raises(ValueError, match=r'diagnostics: .*pmap.*x\[0\]'):
    afo.diagnostics(replicated, stacked)


def test_an_axis_name_outside_its_pmap_is_named(setup):
  _, params, grads, _, _ = setup
  tx = afo.adafisher(1e-3, axis_name='batch')
  state = tx.init(params)
  with pytest.raises(
    ValueError, match=r"axis_name='batch'.*outside a jax.pmap"
  ):
    jax.jit(tx.update)(grads, state, params)


def test_diagnostics_of_params_of_another_model(setup):
  _, params, _, _, _ = setup
  state = afo.adafisher(1e-3).init(params)
  wider = jax.tree.map(lambda p: jnp.zeros(p.shape + (1,)), params)
  with pytest.raises(ValueError, match=r"diagnostics: params '.*' has shape"):
    afo.diagnostics(state, wider)
  with pytest.raises(
    ValueError, match=r"diagnostics: params 'params/.*' is not"
  ):
    afo.diagnostics(state, {'params': params})  # the whole variables dict


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


# --- issue 12: unreadable errors made readable --------------------------------


@pytest.mark.parametrize('argument', ['damping', 'b1', 'gamma', 'fisher_power'])
def test_schedule_for_a_hyperparameter_other_than_the_learning_rate(argument):
  with pytest.raises(TypeError, match=f'{argument}.*inject_hyperparams'):
    afo.adafisher(1e-3, **{argument: optax.constant_schedule(0.5)})


@pytest.mark.parametrize(
  'value', [optax.constant_schedule(10), 2**40, True, '10', 0.5, -3]
)
def test_bad_t_cov(value):
  with pytest.raises((TypeError, ValueError), match='t_cov'):
    afo.adafisher(1e-3, t_cov=value)


def test_none_learning_rate():
  with pytest.raises(TypeError, match='learning_rate'):
    afo.adafisher(None)


@pytest.mark.parametrize('mu_dtype', [jnp.int32, 'int8', 'not a dtype'])
def test_bad_mu_dtype(mu_dtype):
  with pytest.raises(TypeError, match='mu_dtype'):
    afo.adafisher(1e-3, mu_dtype=mu_dtype)


@pytest.mark.parametrize('every_k', [0, -1, 2.5, True])
def test_bad_accumulation_count(setup, every_k):
  model, params, _, _, (x, y) = setup
  layout = afo.curvature_layout(
    afo.value_and_grad_with_curvature(loss_fn(model)), params, x, y
  )
  with pytest.raises(ValueError, match='every_k_schedule'):
    afo.multi_steps(afo.adafisher(1e-3), every_k, layout=layout)


def test_restore_from_a_directory_that_does_not_exist(setup, tmp_path):
  _, params, _, _, _ = setup
  target = {'opt_state': afo.adafisher(1e-3).init(params)}
  with pytest.raises(FileNotFoundError, match='does not exist'):
    afo.checkpoint.restore(tmp_path / 'nothing', target)


def test_checkpoint_of_the_other_numerics(setup, tmp_path):
  import orbax.checkpoint as ocp

  _, params, _, _, _ = setup
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(
      tmp_path / 'ckpt', {'opt_state': afo.adafisher(1e-3).init(params)}
    )
    checkpointer.wait_until_finished()
  paper = {'opt_state': afo.adafisher(1e-3, numerics='paper').init(params)}
  with pytest.raises(ValueError, match=r"numerics='reference'.*'paper'"):
    afo.checkpoint.restore(tmp_path / 'ckpt', paper)


@pytest.mark.parametrize('has_aux', [False, True])
def test_loss_checks_match_jax_value_and_grad(setup, has_aux):
  model, params, _, _, (x, y) = setup

  def per_example(p, x, y):
    logits = model.apply({'params': p}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return (loss, None) if has_aux else loss

  def integer(p, x, y):
    loss = loss_fn(model)(p, x, y).astype(jnp.int32)
    return (loss, None) if has_aux else loss

  checks = {per_example: 'scalar', integer: 'int32'}
  for fun, message in checks.items():
    grad_fn = afo.value_and_grad_with_curvature(fun, has_aux=has_aux)
    with pytest.raises(TypeError, match=message):
      grad_fn(params, x, y)


def test_aux_without_has_aux_and_has_aux_without_aux(setup):
  model, params, _, _, (x, y) = setup

  def with_aux(p, x, y):
    return loss_fn(model)(p, x, y), {'note': 1.0}

  with pytest.raises(TypeError, match='has_aux=True'):
    afo.value_and_grad_with_curvature(with_aux)(params, x, y)
  with pytest.raises(TypeError, match=r'pair \(loss, aux\)'):
    afo.value_and_grad_with_curvature(loss_fn(model), has_aux=True)(
      params, x, y
    )


def test_nnx_loss_checks():
  from flax import nnx

  model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
  x = jnp.ones((4, 5))
  with pytest.raises(TypeError, match='scalar'):
    afo.nnx.value_and_grad_with_curvature(lambda m, x: m(x))(model, x)
  with pytest.raises(TypeError, match='has_aux=True'):
    afo.nnx.value_and_grad_with_curvature(lambda m, x: (m(x).sum(), 1.0))(
      model, x
    )
  with pytest.raises(TypeError, match='capture'):
    afo.nnx.value_and_grad_with_curvature(lambda m, x: m(x).sum())(
      model, x, capture=jnp.bool_(True)
    )


def test_empty_batch_with_normalisation_layers():
  """Batch 0 with LayerNorm: no statistics (rows 0), no refresh, no crash."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name='head')(nn.LayerNorm(name='ln')(x)).sum()

  model = Model()
  params = model.init(jax.random.key(0), jnp.ones((2, 4)))['params']
  grad_fn = afo.value_and_grad_with_curvature(
    lambda p, x: model.apply({'params': p}, x)
  )
  _, grads, curvature = grad_fn(params, jnp.ones((0, 4)))
  assert float(curvature['ln'].rows) == 0
  tx = afo.adafisher(1e-3, t_cov=1)
  _, state = tx.update(grads, tx.init(params), params, curvature=curvature)
  assert int(afo.adafisher_state(state).factors['ln'].refreshes) == 0


# --- issue 12: fragile places pinned ------------------------------------------


def test_flax_interceptor_hands_over_the_original_method():
  """The linen front end recognises layer calls by this Flax behaviour."""
  import functools

  seen = []

  def interceptor(next_fun, args, kwargs, context):
    seen.append(context.orig_method)
    return next_fun(*args, **kwargs)

  layer = nn.Dense(2)
  variables = layer.init(jax.random.key(0), jnp.ones((1, 3)))
  with nn.intercept_methods(interceptor):
    layer.apply(variables, jnp.ones((1, 3)))
  assert isinstance(seen[0], functools.partial)
  assert (
    getattr(seen[0].func, '__wrapped__', seen[0].func)
    is getattr(nn.Dense.__call__, '__wrapped__', nn.Dense.__call__)
    or seen[0].func.__qualname__ == 'Dense.__call__'
  )


class DenseMonotone(nn.Dense):
  """As in VDM (google-research/vdm): overrides ``__call__`` without calling
  ``nn.Dense.__call__``."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      'kernel', self.kernel_init, (x.shape[-1], self.features)
    )
    y = jnp.dot(x, jnp.abs(kernel))
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,))
    return y


class _WithMonotone(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(4, name='dense')(x))
    return DenseMonotone(2, name='monotone')(h)


def test_subclass_that_bypasses_its_base_is_reported_and_the_rest_captured():
  model = _WithMonotone()
  x = jax.random.normal(jax.random.key(0), (3, 5))
  params = model.init(jax.random.key(1), x)['params']

  def loss(p, x):
    return jnp.sum(model.apply({'params': p}, x) ** 2)

  with pytest.warns(
    afo.UnsupportedLayerWarning,
    match=r'monotone \(DenseMonotone: its __call__ does not call Dense',
  ):
    _, grads, curvature = afo.value_and_grad_with_curvature(loss)(params, x)
  assert sorted(curvature) == ['dense']
  assert afo.unpreconditioned_parameters(params, curvature) == [
    'monotone/bias',
    'monotone/kernel',
  ]
  chex.assert_trees_all_close(grads, jax.grad(loss)(params, x))
  with warnings.catch_warnings():
    warnings.simplefilter('error', afo.UnsupportedLayerWarning)
    _, _, excluded = afo.value_and_grad_with_curvature(
      loss, exclude=(DenseMonotone,)
    )(params, x)
  chex.assert_trees_all_close(excluded, curvature)
  _, _, kept = afo.value_and_grad_with_curvature(loss, layers=(nn.Dense,))(
    params, x
  )
  assert sorted(kept) == ['dense']


def test_exclude_names_what_it_does_not_know():
  with pytest.raises(TypeError, match=r'exclude: .*not a registered layer'):
    afo.value_and_grad_with_curvature(lambda p: 0.0, exclude=(int,))


def test_sessions_are_per_thread(setup):
  """Captures traced in two threads at once do not see each other's layers."""
  import concurrent.futures

  model, params, _, curvature, (x, y) = setup
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model))
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(lambda _: grad_fn(params, x, y)[2], range(8)))
  for got in results:
    chex.assert_trees_all_close(got, curvature)


# --- a battery of further malformed uses ---------------------------------------


def test_capture_flag_must_be_a_bool(setup):
  model, params, _, curvature, (x, y) = setup
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model))
  for flag in ('yes', 1, jnp.ones(())):
    with pytest.raises(TypeError, match=r'capture must be a bool.*got'):
      grad_fn(params, x, y, capture=flag)
  _, _, got = grad_fn(params, x, y, capture=np.bool_(True))
  chex.assert_trees_all_close(got, curvature)
  assert grad_fn(params, x, y, capture=np.bool_(False))[2] is None


def test_checkpoint_around_the_whole_loss_names_the_cause_and_the_fix(setup):
  model, params, _, _, (x, y) = setup
  grad_fn = afo.value_and_grad_with_curvature(jax.checkpoint(loss_fn(model)))
  with pytest.raises(
    afo.CaptureError, match=r'jax\.checkpoint.*saves no memory.*nn\.remat'
  ):
    grad_fn(params, x, y)


def test_loss_that_closes_over_the_outer_params(setup):
  model, params, _, _, (x, y) = setup
  outer = params

  def loss(p, x, y):
    del p
    return loss_fn(model)(outer, x, y)

  with pytest.raises(
    afo.CaptureError, match=r'No captured layer read the params of the first'
  ):
    afo.value_and_grad_with_curvature(loss)(params, x, y)


def _summed_output(model):
  """``(params, x, capture of sum(model(x)))`` of a small linen model."""
  x = jnp.ones((3, 4))
  params = model.init(jax.random.key(0), x)['params']
  grad_fn = afo.value_and_grad_with_curvature(
    lambda p, x: model.apply({'params': p}, x).sum()
  )
  return params, x, grad_fn


class _NamedW(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param('w', nn.initializers.ones, (x.shape[-1], 2))
    return x @ w + self.param('b', nn.initializers.zeros, (2,))


def test_registered_weight_name_the_layer_does_not_have():
  afo.register_layer(
    _NamedW, afo.rules.DENSE, lambda m, x, k: afo.rules.Dense(), weight='kernel'
  )
  params, x, grad_fn = _summed_output(_NamedW())
  with pytest.raises(
    afo.CaptureError,
    match=r"'<root>' \(_NamedW\) has no parameter 'kernel' \(its "
    r'parameters: b, w\)',
  ):
    grad_fn(params, x)


class _TwoMethods(nn.Module):
  def setup(self):
    self.kernel = self.param('kernel', nn.initializers.ones, (4, 2))

  def __call__(self, x):
    return self.project(x)

  def project(self, x):
    return x @ self.kernel


class _CallsProject(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name='head')(_TwoMethods(name='two').project(x))


def test_a_registered_layer_through_another_method_is_reported():
  afo.register_layer(
    _TwoMethods,
    afo.rules.DENSE,
    lambda m, x, k: afo.rules.Dense(use_bias=False),
  )  # __call__ only
  params, x, grad_fn = _summed_output(_CallsProject())
  with pytest.warns(
    afo.UnsupportedLayerWarning,
    match=r"two \(_TwoMethods: method 'project' not captured\)",
  ):
    _, _, curvature = grad_fn(params, x)
  assert set(curvature) == {'head'}


def test_fun_must_be_callable():
  with pytest.raises(TypeError, match='fun must be callable'):
    afo.value_and_grad_with_curvature('loss')


def test_integer_leaf_in_the_captured_params(setup):
  model, params, _, _, (x, y) = setup
  bad = {**params, 'step': jnp.zeros((), jnp.int32)}
  with pytest.raises(TypeError, match="'step'"):
    afo.value_and_grad_with_curvature(
      lambda p, x, y: loss_fn(model)(
        {k: v for k, v in p.items() if k != 'step'}, x, y
      )
    )(bad, x, y)


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(relative_damping=-0.1), 'relative_damping'),
    (dict(relative_damping=float('nan')), 'relative_damping'),
    (dict(relative_damping=optax.constant_schedule(1.0)), 'relative_damping'),
    (dict(ablation='shuffled'), 'ablation'),
    (dict(weight_decay=float('nan')), 'weight_decay'),
    (dict(damping=float('inf')), 'damping'),
    (dict(b1='0.9'), 'b1'),
  ],
)
def test_more_bad_hyperparameters(kwargs, match):
  with pytest.raises((TypeError, ValueError), match=match):
    afo.adafisher(1e-3, **kwargs)


@pytest.mark.parametrize('value', ['1e-3', 1e-3 + 0j])
def test_a_learning_rate_that_is_not_a_real_number_is_named(value):
  with pytest.raises(TypeError, match='learning_rate must be a real number'):
    afo.adafisher(value)


@pytest.mark.parametrize('alias', [afo.adafisher, afo.adafisher_like_adam])
def test_bfloat16_hyperparameters_are_real_numbers(alias):
  """optax.inject_hyperparams casts hyperparameters to the params' dtype:
  bfloat16 (NumPy kind 'V') is a real number, as optax.adam takes it."""
  params = {'w': jnp.ones((4, 3), jnp.bfloat16)}
  tx = optax.inject_hyperparams(alias, static_args=('t_cov',))(1e-3)
  state = tx.init(params)
  assert state.hyperparams['learning_rate'].dtype == jnp.bfloat16
  with pytest.warns(afo.UnpreconditionedParametersWarning):
    tx.update(params, state, params)
  alias(jnp.asarray(1e-3, jnp.bfloat16))
  with pytest.raises(ValueError, match='learning_rate must be non-negative'):
    alias(jnp.asarray(-1e-3, jnp.bfloat16))


def test_infinite_learning_rate():
  with pytest.raises(ValueError, match='learning_rate'):
    afo.adafisher(float('inf'))


def test_layout_that_is_not_a_curvature_tree():
  with pytest.raises(TypeError, match='curvature must be the tree'):
    afo.adafisher(1e-3, layout={'head': jnp.ones(3)})


def test_gradients_of_other_params(setup):
  _, params, grads, _, _ = setup
  tx = afo.adafisher(1e-3)
  state = tx.init(params)
  extra = {**grads, 'extra': {'kernel': jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match="'extra/kernel'"):
    tx.update(extra, state, params)
  transposed = {
    **grads,
    'head': {**grads['head'], 'kernel': grads['head']['kernel'].T},
  }
  with pytest.raises(ValueError, match="'head/kernel' has shape"):
    tx.update(transposed, state, params)


def test_refresh_schedule_needs_one_adafisher_state(setup):
  _, params, _, _, _ = setup
  with pytest.raises(ValueError, match='exactly one AdaFisherState'):
    afo.refresh_schedule(optax.adam(1e-3).init(params))
  two = optax.chain(afo.adafisher(1e-3), afo.adafisher(1e-3))
  with pytest.raises(ValueError, match='found 2'):
    afo.refresh_schedule(two.init(params))


def test_state_shardings_with_too_few_shardings(setup):
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  _, params, _, _, _ = setup
  mesh = jax.make_mesh((1,), ('x',))
  shardings = {'head': {'kernel': NamedSharding(mesh, P())}}
  with pytest.raises(ValueError, match='one sharding per parameter'):
    afo.state_shardings(afo.adafisher(1e-3), params, shardings)


def test_register_layer_checks_its_arguments():
  with pytest.raises(TypeError, match='layer_class'):
    afo.register_layer(nn.Dense(3), afo.rules.DENSE, lambda m, x, k: None)
  with pytest.raises(TypeError, match='rule'):
    afo.register_layer(DenseMonotone, 'dense', lambda m, x, k: None)
  with pytest.raises(TypeError, match='adapter'):
    afo.register_layer(DenseMonotone, afo.rules.DENSE, None)
  with pytest.raises(TypeError, match='methods'):
    afo.register_layer(
      DenseMonotone, afo.rules.DENSE, lambda m, x, k: None, methods='__call__'
    )
  with pytest.raises(ValueError, match="DenseMonotone has no method 'forward'"):
    afo.register_layer(
      DenseMonotone, afo.rules.DENSE, lambda m, x, k: None, methods=('forward',)
    )

  class Impostor(afo.rules.DenseRule):
    pass

  with pytest.raises(ValueError, match="rule named 'dense'"):
    afo.register_layer(DenseMonotone, Impostor(), lambda m, x, k: None)
  with pytest.raises(TypeError, match='in_axes must be a tuple of ints'):
    afo.rules.Dense(False)  # use_bias given as in_axes
  with pytest.raises(TypeError, match='Flax linen or NNX Module class'):
    afo.register_layer(dict, afo.rules.DENSE, lambda m, x, k: None)
  with pytest.raises(ValueError, match=r'its own methods: __call__\.'):
    afo.register_layer(
      _Faulty, afo.rules.DENSE, lambda m, x, k: None, methods=('forward',)
    )

  class Nameless(afo.rules.DenseRule):
    name = ''

  with pytest.raises(TypeError, match=r"Nameless has no name.*name = '...'"):
    afo.register_layer(_Faulty, Nameless(), lambda m, x, k: None)


class _Faulty(nn.Module):
  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.ones, (x.shape[-1], 2))
    return x @ kernel


def test_adapter_failures_name_the_layer():
  def adapter(layer, x, kwargs):
    raise KeyError('features')

  afo.register_layer(_Faulty, afo.rules.DENSE, adapter)
  params, x, grad_fn = _summed_output(_Faulty())
  with pytest.raises(afo.CaptureError, match=r"'<root>' \(_Faulty\).*KeyError"):
    grad_fn(params, x)


class _Transposed(nn.Module):
  """``x @ w.T + b`` with ``w`` stored [outputs, inputs]: not the dense
  rule's [inputs, outputs] layout."""

  @nn.compact
  def __call__(self, x):
    w = self.param('w', nn.initializers.ones, (2, x.shape[-1]))
    return x @ w.T + self.param('b', nn.initializers.zeros, (2,))


@pytest.mark.parametrize(
  'registration, match',
  [
    (dict(weight='w', bias='b'), r"weight 'w' of shape \(2, 4\) does not fit"),
    (dict(weight='b', bias='w'), r"weight 'b' of shape \(2,\) does not fit"),
  ],
)
def test_a_registration_that_does_not_fit_its_layer_is_reported(
  registration, match
):
  """A transposed kernel (the same size as the rule's layout) or swapped
  roles: the layer is reported and left at F~ = 1, not preconditioned with
  a scrambled F~."""
  afo.register_layer(
    _Transposed, afo.rules.DENSE, lambda m, x, k: afo.rules.Dense(),
    **registration,
  )  # fmt: skip
  params, x, grad_fn = _summed_output(_Transposed())
  with pytest.warns(afo.UnsupportedLayerWarning, match=match):
    _, _, curvature = grad_fn(params, x)
  assert curvature == {}


class _EncodeDecode(nn.Module):
  @nn.compact
  def __call__(self, x):
    return self.decode(self.encode(x))

  @nn.compact
  def encode(self, x):
    return x @ self.param('w_enc', nn.initializers.ones, (4, 4))

  def decode(self, x):
    return x @ self.param('w_dec', nn.initializers.ones, (4, 4))


def test_two_methods_of_one_rule_reading_different_parameters_say_so():
  for method, weight in (('encode', 'w_enc'), ('decode', 'w_dec')):
    afo.register_layer(
      _EncodeDecode, afo.rules.DENSE, lambda m, x, k: afo.rules.Dense(use_bias=False),
      methods=(method,), weight=weight, bias=None,
    )  # fmt: skip
  params, x, grad_fn = _summed_output(_EncodeDecode())
  with pytest.warns(
    afo.UnsupportedLayerWarning, match=r"'dense' rule differ in roles"
  ):
    grad_fn(params, x)


def test_rule_failures_and_an_adapter_without_a_configuration_name_the_layer():
  afo.register_layer(_Faulty, afo.rules.DENSE, lambda m, x, k: None)
  params, x, grad_fn = _summed_output(_Faulty())
  with pytest.raises(
    afo.CaptureError, match=r'\(_Faulty\): its adapter returned None'
  ):
    grad_fn(params, x)
  afo.register_layer(
    _Faulty, afo.rules.EMBED, lambda m, x, k: afo.rules.Embed(num_embeddings=4)
  )
  with pytest.raises(
    afo.CaptureError, match=r"\(_Faulty\): its 'embed' rule raised TypeError"
  ):
    grad_fn(params, x)


def test_sampled_fisher_under_a_cached_trace_is_named(setup):
  model, params, _, _, (x, y) = setup

  cross_entropy = jax.checkpoint(afo.softmax_cross_entropy)

  def loss(p, x, y):
    return cross_entropy(model.apply({'params': p}, x), y)

  grad_fn = afo.value_and_grad_with_curvature(loss, fisher='sampled')
  with pytest.raises(afo.CaptureError, match='reused its cached trace'):
    grad_fn(params, x, y, fisher_key=jax.random.key(0))


def test_sampled_fisher_inside_vmap_is_named():
  dense = nn.Dense(3)
  x, y = jnp.ones((4, 2)), jnp.arange(4) % 3
  params = dense.init(jax.random.key(0), x)['params']

  def per_example(p, x, y):
    logits = dense.apply({'params': p}, x)
    return jax.vmap(
      lambda row, t: afo.softmax_cross_entropy(row[None], t[None])
    )(logits, y).mean()

  grad_fn = afo.value_and_grad_with_curvature(per_example, fisher='sampled')
  with pytest.raises(afo.CaptureError, match=r'inside a transformation.*vmap'):
    grad_fn(params, x, y, fisher_key=jax.random.key(1))


def test_restore_legacy_of_a_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    afo.checkpoint.restore_legacy(tmp_path / 'none', {})


def test_tags_index_on_params_that_are_not_stacked():
  params = {'fc': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}

  def loss(p, x):
    return afo.tags.dense(x, p['fc'], index=0).sum()

  with pytest.raises(afo.CaptureError, match='index= was given'):
    afo.value_and_grad_with_curvature(loss)(params, jnp.ones((4, 3)))


def test_curvature_layout_of_a_function_without_curvature():
  params = {'fc': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}
  loss = lambda p, x: afo.tags.dense(x, p['fc']).sum()  # noqa: E731
  with pytest.raises(
    TypeError, match=r'value_and_grad_with_curvature.*tuple of 2'
  ):
    afo.curvature_layout(jax.value_and_grad(loss), params, jnp.ones((4, 3)))


def test_tags_index_outside_the_stack():
  stacked = {'fc': {'kernel': jnp.ones((3, 3, 2)), 'bias': jnp.zeros((3, 2))}}

  def loss(p, x, index):
    layer = jax.tree.map(lambda a: a[2], p['fc'])
    return afo.tags.dense(x, layer, name='fc', index=index).sum()

  grad_fn = afo.value_and_grad_with_curvature(loss)
  _, _, curvature = grad_fn(stacked, jnp.ones((4, 3)), -1)  # the last one
  np.testing.assert_array_equal(curvature['fc'].rows, [0, 0, 4])
  with pytest.raises(afo.CaptureError, match=r'index= 3 is outside.*\(3,\)'):
    grad_fn(stacked, jnp.ones((4, 3)), 3)


def test_tags_name_that_is_not_a_path_of_the_params():
  params = {'fc': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}

  def loss(p, x):
    return afo.tags.dense(x, p['fc'], name='nowhere').sum()

  with pytest.raises(afo.CaptureError, match=r"'nowhere'.*no params"):
    afo.value_and_grad_with_curvature(loss)(params, jnp.ones((4, 3)))


@pytest.mark.parametrize(
  'kwargs,error,match',
  [
    (
      dict(damping=jnp.array([1e-3, 1e-3])),
      ValueError,
      'damping must be a scalar',
    ),
    (
      dict(b1=jnp.array([[0.9]])),
      ValueError,
      r'b1 must be a scalar .* \(1, 1\)',
    ),
    (dict(learning_rate=[1e-3]), ValueError, 'learning_rate must be a scalar'),
    (
      dict(learning_rate=True),
      TypeError,
      'learning_rate must be a real number',
    ),
    (dict(gamma=True), TypeError, 'gamma must be a real number'),
    (dict(b2=5.0, grafting='adam'), ValueError, r'b2 must be in \[0, 1\)'),
    (dict(b2='0.9'), TypeError, 'b2 must be a real number'),
    (dict(eps=jnp.ones(2)), ValueError, 'eps must be a scalar'),
  ],
)
def test_hyperparameters_that_are_not_real_scalars(kwargs, error, match):
  """Non-scalars and bools are refused when the optimizer is built (they
  broadcast the params to another shape, or count as 1.0); b2 and eps are
  checked for a number even where only grafting='adam' uses them."""
  kwargs = {'learning_rate': 1e-3, **kwargs}
  with pytest.raises(error, match=match):
    afo.adafisher(**kwargs)


def test_a_python_float_parameter_is_optimised_as_by_adam():
  params = {'w': jnp.ones(3), 'temperature': 1.0}
  grads = {'w': jnp.ones(3), 'temperature': 0.5}
  tx = afo.adafisher(1e-3)
  with pytest.warns(afo.UnpreconditionedParametersWarning):
    updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['temperature'], -0.5e-3, rtol=1e-6)


def test_capture_false_is_jax_value_and_grad_for_any_params():
  def loss(params, x):
    return jnp.sum((params[0] * x) ** 2)

  grad_fn = afo.value_and_grad_with_curvature(loss)
  params, x = [jnp.ones(2)], jnp.ones(2)
  value, grads, curvature = grad_fn(params, x, capture=False)
  want = jax.value_and_grad(loss)(params, x)
  chex.assert_trees_all_equal((value, grads), want)
  assert curvature is None


def test_the_capture_function_has_the_signature_it_documents(setup):
  """``capture`` is found by jax.jit's static_argnames."""
  model, params, _, _, (x, y) = setup

  def loss(params, x, y, **options):
    return loss_fn(model)(params, x, y)

  with_options = afo.value_and_grad_with_curvature(loss)
  assert str(inspect.signature(with_options)) == (
    '(params, x, y, *, capture=True, fisher_key=None, **options)'
  )
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model))
  jitted = jax.jit(grad_fn, static_argnames='capture')
  assert jitted(params, x, y, capture=False)[2] is None
  assert set(jitted(params, x, y)[2]) == {'dense0', 'dense1', 'head'}


def test_diagnostics_refuses_a_damping_the_state_contradicts(setup):
  _, params, grads, curvature, _ = setup
  tx = afo.adafisher(1e-3, damping=1e-3, t_cov=1)
  _, state = tx.update(grads, tx.init(params), params, curvature=curvature)
  assert afo.diagnostics(state, params, damping=1e-3).layers
  with pytest.raises(
    ValueError, match=r'damping=100.0 was given, but .* 0.001'
  ):
    afo.diagnostics(state, params, damping=100.0)
  with pytest.raises(ValueError, match=r'relative_damping=0\.1 was given'):
    afo.diagnostics(state, params, relative_damping=0.1)
  tiny = afo.adafisher(1e-3, damping=1e-9, t_cov=1)
  _, state = tiny.update(grads, tiny.init(params), params, curvature=curvature)
  with pytest.raises(ValueError, match='damping=9e-09 was given'):
    afo.diagnostics(state, params, damping=9e-9)


def test_gradients_in_other_containers_than_the_params(setup):
  _, params, grads, _, _ = setup
  tx = afo.adafisher(1e-3)
  with pytest.raises(TypeError, match=r'other containers .* FrozenDict'):
    tx.update(flax.core.freeze(grads), tx.init(params), params)
