"""Flax NNX capture: the same statistics and updates as the linen path."""

import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adafisher_optax as afo

import brute_force as bf
from models import MLP, ConvNet, run

pytestmark = pytest.mark.usefixtures('x64')
TOL = dict(rtol=1e-12, atol=1e-14)


# NumPy draws the random numbers: JAX would compile its RNG once per shape.


def _x(*shape, seed=3, scale=1.0, shift=0.0):
  normal = np.random.default_rng(seed).standard_normal(shape)
  return jnp.asarray(scale * normal + shift)


def _readout(shape):
  r = _x(*shape, seed=7)
  return lambda out: jnp.sum(jnp.sin(out) * r)


def _init(make, seed=1):
  """``make()`` with float64 variables drawn by NumPy.

  The model is built abstractly (``nnx.eval_shape``); scales and variances
  are ``1 + 0.3 N(0, 1)``, other parameters and means ``0.3 N(0, 1)``.
  """
  model = nnx.eval_shape(make)
  rng = np.random.default_rng(seed)
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (nnx.Param, nnx.BatchStat)):
      value = 0.3 * rng.standard_normal(node.shape)
      node.set_value(jnp.asarray(value + (path[-1] in ('scale', 'var'))))
    elif isinstance(node, nnx.RngKey):
      node.set_value(jax.random.key(seed))
    elif isinstance(node, nnx.RngCount):
      node.set_value(jnp.zeros(node.shape, node.dtype))
  return model


def _batch(seed, shape, classes=3):
  rng = np.random.default_rng(seed)
  return _x(*shape, seed=seed), jnp.asarray(rng.integers(0, classes, shape[0]))


def _linen_variables(model):
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  return {'params': params, **({'batch_stats': stats} if stats else {})}


def _assert_same_statistics(got, want, name=''):
  assert (got.rule, got.weight_name, got.bias_name) == (
    want.rule,
    want.weight_name,
    want.bias_name,
  ), name
  for field in ('input_sums', 'output_sums', 'rows'):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, err_msg=name, **TOL),
      getattr(got, field),
      getattr(want, field),
    )


def _assert_trees_close(got, want, **tol):
  def close(a, b):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_allclose(a, b, **(tol or TOL))

  jax.tree.map(close, got, want)


# name: (NNX layer, its linen twin, input shape; None for token ids)
LAYERS = {
  'linear_2d': (lambda r: nnx.Linear(5, 4, rngs=r), nn.Dense(4), (6, 5)),
  'linear_3d_no_bias': (
    lambda r: nnx.Linear(5, 4, use_bias=False, rngs=r),
    nn.Dense(4, use_bias=False),
    (3, 4, 5),
  ),
  'linear_general': (
    lambda r: nnx.LinearGeneral((4, 5), (2, 3), axis=(-2, -1), rngs=r),
    nn.DenseGeneral((2, 3), axis=(-2, -1)),
    (3, 4, 5),
  ),
  'conv_strided_dilated_grouped': (
    lambda r: nnx.Conv(
      4,
      6,
      (3, 2),
      strides=(2, 1),
      padding=((1, 2), (0, 1)),
      kernel_dilation=(2, 1),
      feature_group_count=2,
      rngs=r,
    ),
    nn.Conv(
      6,
      (3, 2),
      strides=(2, 1),
      padding=((1, 2), (0, 1)),
      kernel_dilation=(2, 1),
      feature_group_count=2,
    ),
    (3, 7, 6, 4),
  ),
  'conv_1d_causal_no_bias': (
    lambda r: nnx.Conv(
      3, 3, 5, padding='CAUSAL', kernel_dilation=2, use_bias=False, rngs=r
    ),
    nn.Conv(3, (5,), padding='CAUSAL', kernel_dilation=2, use_bias=False),
    (2, 11, 3),
  ),
  'embed': (
    lambda r: nnx.Embed(7, 4, dtype=jnp.float64, rngs=r),
    nn.Embed(7, 4),
    None,
  ),
  'conv_transpose_strided': (
    lambda r: nnx.ConvTranspose(4, 5, (3, 2), strides=(2, 1), rngs=r),
    nn.ConvTranspose(5, (3, 2), strides=(2, 1)),
    (2, 4, 3, 4),
  ),
  'conv_transpose_1d_valid_dilated_no_bias': (
    lambda r: nnx.ConvTranspose(
      3,
      2,
      3,
      strides=2,
      padding='VALID',
      kernel_dilation=2,
      use_bias=False,
      rngs=r,
    ),
    nn.ConvTranspose(
      2,
      (3,),
      strides=(2,),
      padding='VALID',
      kernel_dilation=(2,),
      use_bias=False,
    ),
    (2, 5, 3),
  ),
  'linear_general_batch_axis': (
    lambda r: nnx.LinearGeneral(5, (2, 3), batch_axis={0: 3}, rngs=r),
    nn.DenseGeneral((2, 3), batch_dims=(0,)),
    (3, 4, 5),
  ),
  'einsum_gemma_query': (
    lambda r: nnx.Einsum('BTD,NDH->BTNH', (3, 5, 4), (3, 4), rngs=r),
    nn.Einsum((3, 5, 4), 'BTD,NDH->BTNH'),
    (2, 6, 5),
  ),
  'einsum_stacked_heads_no_bias': (
    lambda r: nnx.Einsum('BNTH,NHD->BNTD', (3, 4, 5), rngs=r),
    nn.Einsum((3, 4, 5), 'BNTH,NHD->BNTD', use_bias=False),
    (2, 3, 6, 4),
  ),
  'conv_transpose_transposed_kernel': (
    lambda r: nnx.ConvTranspose(
      4, 3, (3, 2), strides=(2, 1), transpose_kernel=True, rngs=r
    ),
    nn.ConvTranspose(3, (3, 2), strides=(2, 1), transpose_kernel=True),
    (2, 4, 3, 4),
  ),
  'layer_norm': (lambda r: nnx.LayerNorm(5, rngs=r), nn.LayerNorm(), (3, 4, 5)),
  'layer_norm_2d_no_bias': (
    lambda r: nnx.LayerNorm(5, use_bias=False, rngs=r),
    nn.LayerNorm(use_bias=False),
    (6, 5),
  ),
  'rms_norm': (lambda r: nnx.RMSNorm(5, rngs=r), nn.RMSNorm(), (3, 4, 5)),
  'batch_norm_train': (
    lambda r: nnx.BatchNorm(5, use_running_average=False, rngs=r),
    nn.BatchNorm(use_running_average=False),
    (4, 3, 3, 5),
  ),
  'batch_norm_eval': (
    lambda r: nnx.BatchNorm(5, use_running_average=True, rngs=r),
    nn.BatchNorm(use_running_average=True),
    (4, 3, 5),
  ),
  'group_norm': (
    lambda r: nnx.GroupNorm(6, num_groups=2, rngs=r),
    nn.GroupNorm(num_groups=2),
    (3, 4, 4, 6),
  ),
}


class Zoo(nnx.Module):
  """NNX layers of :data:`LAYERS`, each applied to its own input."""

  def __init__(self, names, rngs):
    for name in names:
      setattr(self, name, LAYERS[name][0](rngs))

  def __call__(self, inputs):
    return {name: getattr(self, name)(x) for name, x in inputs.items()}


class LinenZoo(nn.Module):
  """The linen twins of :class:`Zoo`, named alike."""

  @nn.compact
  def __call__(self, inputs):
    return {
      name: LAYERS[name][1].clone(parent=self, name=name)(x)
      for name, x in inputs.items()
    }


def _zoo_inputs(names):
  inputs = {
    name: _x(*LAYERS[name][2], seed=i, scale=1.7, shift=0.3)
    for i, name in enumerate(names)
    if name != 'embed'
  }
  if 'embed' in names:
    inputs['embed'] = jnp.array([[0, 3, 3, 1], [5, 3, 0, 0]])
  return inputs


def test_every_layer_type_gives_the_statistics_of_its_linen_twin():
  names = tuple(LAYERS)  # the statistics serve both numerics
  model = _init(lambda: Zoo(names, nnx.Rngs(0)))
  inputs = _zoo_inputs(names)
  types = {name: type(getattr(model, name)) for name in names}
  variables = _linen_variables(model)
  twin = LinenZoo()

  def linen_apply(p, inputs):
    return twin.apply(
      {**variables, 'params': p}, inputs, mutable=['batch_stats']
    )

  shapes = jax.eval_shape(linen_apply, variables['params'], inputs)[0]
  r = {name: _readout(y.shape) for name, y in shapes.items()}

  def readout(outputs):
    return sum(r[name](y) for name, y in outputs.items())

  def linen_loss(p, inputs):
    outputs, updates = linen_apply(p, inputs)
    return readout(outputs), updates

  (want_loss, linen_updates), want_grads, want = jax.jit(
    afo.value_and_grad_with_curvature(linen_loss, has_aux=True)
  )(variables['params'], inputs)
  grad_fn = afo.nnx.value_and_grad_with_curvature(
    lambda m, inputs: readout(m(inputs))
  )
  loss, grads, curvature = nnx.jit(grad_fn)(model, inputs)
  np.testing.assert_allclose(loss, want_loss, **TOL)
  _assert_trees_close(nnx.to_pure_dict(grads), want_grads)
  assert sorted(curvature) == sorted(want) == sorted(names)
  for name in names:
    _assert_same_statistics(curvature[name], want[name], name)
  # BatchNorm's running statistics update as in linen; nothing else changes.
  _assert_trees_close(
    nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
    linen_updates['batch_stats'],
  )
  for name in names:
    assert type(getattr(model, name)) is types[name]
    assert not hasattr(getattr(model, name), afo.session.PROBE)


# --- training with nnx.Optimizer under nnx.jit ------------------------------


class NNXMLP(nnx.Module):
  """The twin of ``models.MLP``; ``remat`` recomputes the hidden layers."""

  def __init__(self, d_in, rngs, widths=(16, 8), classes=3, remat=False):
    sizes = (d_in, *widths)
    for i in range(len(widths)):
      setattr(self, f'dense{i}', nnx.Linear(sizes[i], sizes[i + 1], rngs=rngs))
    self.head = nnx.Linear(sizes[-1], classes, rngs=rngs)
    self.n_hidden = len(widths)
    self.remat = remat

  def hidden(self, x):
    for i in range(self.n_hidden):
      x = jnp.tanh(getattr(self, f'dense{i}')(x))
    return x

  def __call__(self, x):
    hidden = nnx.remat(NNXMLP.hidden) if self.remat else NNXMLP.hidden
    return self.head(hidden(self, x))


class NNXConvNet(nnx.Module):
  """The twin of ``models.ConvNet``."""

  def __init__(self, c_in, rngs):
    self.conv = nnx.Conv(c_in, 4, (3, 3), rngs=rngs)
    self.gn = nnx.GroupNorm(4, num_groups=2, rngs=rngs)
    self.ln = nnx.LayerNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.gn(self.conv(x)))
    return self.head(self.ln(x.mean(axis=(1, 2))))


def _linen_params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _nnx_loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_cnn_train_steps_equal_the_linen_loop():
  """Conv, GroupNorm, LayerNorm, Linear; ``paper`` numerics, where F~ counts."""
  batches = [_batch(i, (4, 6, 6, 2)) for i in range(3)]
  model = _init(lambda: NNXConvNet(2, nnx.Rngs(0)))
  tx = afo.adafisher(0.05, numerics='paper')
  want, _ = run(ConvNet(), tx, _linen_params(model), batches)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grad_fn = afo.nnx.value_and_grad_with_curvature(_nnx_loss)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads, curvature = grad_fn(model, x, y)
    optimizer.update(model, grads, curvature=curvature)
    return loss

  with warnings.catch_warnings():
    warnings.simplefilter('error', afo.UnpreconditionedParametersWarning)
    for x, y in batches:
      train_step(model, optimizer, x, y)
  _assert_trees_close(_linen_params(model), want, rtol=1e-10, atol=1e-12)
  assert int(optimizer.step[...]) == 3


def test_remat_and_sampled_fisher_give_the_linen_statistics():
  """An MLP whose hidden layers run under ``nnx.remat``."""
  x, y = _batch(0, (8, 5))
  linen_model = MLP()
  model = _init(lambda: NNXMLP(5, nnx.Rngs(0), remat=True))

  def linen_loss(p, x, y):
    return afo.softmax_cross_entropy(linen_model.apply({'params': p}, x), y)

  def nnx_loss(m, x, y):
    return afo.softmax_cross_entropy(m(x), y)

  def empirical_and_sampled(capture, loss):
    empirical, sampled = capture(loss), capture(loss, fisher='sampled')
    return lambda m, x, y, key: (
      empirical(m, x, y),
      sampled(m, x, y, fisher_key=key),
    )

  key = jax.random.key(4)
  want = jax.jit(
    empirical_and_sampled(afo.value_and_grad_with_curvature, linen_loss)
  )(_linen_params(model), x, y, key)
  got = nnx.jit(
    empirical_and_sampled(afo.nnx.value_and_grad_with_curvature, nnx_loss)
  )(model, x, y, key)
  for (_, grads, curvature), (_, want_grads, want_curvature) in zip(got, want):
    _assert_trees_close(nnx.to_pure_dict(grads), want_grads)
    for name in ('dense0', 'dense1', 'head'):  # dense0, dense1 under remat
      _assert_same_statistics(curvature[name], want_curvature[name], name)


# --- lifted transforms, shared and subclassed layers -------------------------


class Block(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(5, 5, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.dense(x))


class Stack(nnx.Module):
  """Blocks stacked with ``nnx.vmap``, applied with ``nnx.scan``."""

  def __init__(self, n, rngs, remat=False, state_axes=None):
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
      return Block(nnx.Rngs(key))

    self.blocks = create(jax.random.split(rngs.params(), n))
    self.remat = remat
    self.state_axes = None if state_axes is None else tuple(state_axes.items())

  def __call__(self, x):
    def body(block, x):
      return block(x)

    body = nnx.remat(body) if self.remat else body
    axes = (
      0 if self.state_axes is None else nnx.StateAxes(dict(self.state_axes))
    )
    return nnx.scan(body, in_axes=(axes, nnx.Carry), out_axes=nnx.Carry)(
      self.blocks, x
    )


def _chain(x, kernels, biases, readout):
  """Inputs and output gradients of ``x_{l+1} = tanh(x_l W_l + b_l)``."""

  def loss(perturbations):
    inputs, h = [], x
    for w, b, p in zip(kernels, biases, perturbations):
      inputs.append(h)
      h = jnp.tanh(h @ w + b + p)
    return readout(h), inputs

  zeros = [jnp.zeros(x.shape[:-1] + (w.shape[1],)) for w in kernels]
  g, inputs = jax.grad(loss, has_aux=True)(zeros)
  return inputs, g


@pytest.mark.parametrize('remat', [False, True])
def test_scan_over_vmapped_layers_gives_per_layer_statistics(remat):
  model = _init(lambda: Stack(3, nnx.Rngs(0), remat=remat))
  x = _x(4, 5)
  readout = _readout(x.shape)
  kernels = model.blocks.dense.kernel[...]
  assert kernels.shape == (3, 5, 5)
  inputs, g = _chain(x, kernels, model.blocks.dense.bias[...], readout)
  grad_fn = afo.nnx.value_and_grad_with_curvature(lambda m, x: readout(m(x)))
  _, grads, curvature = grad_fn(model, x)
  _assert_trees_close(
    nnx.to_pure_dict(grads),
    {
      'blocks': {
        'dense': {
          'kernel': np.stack([a.T @ b for a, b in zip(inputs, g)]),
          'bias': np.stack([b.sum(0) for b in g]),
        }
      }
    },
  )
  stats = curvature['blocks']['dense']
  h, s = stats.means()
  assert h.shape == (3, 6) and s.shape == (3, 5)
  for layer in range(3):
    want_h, want_s = bf.dense(inputs[layer], g[layer], [1], 1, True)
    np.testing.assert_allclose(h[layer], want_h, **TOL)
    np.testing.assert_allclose(s[layer], want_s, **TOL)
  if remat:
    return
  # Stacked factors, sized by the layout or (with a bias) by the params;
  # nnx.Optimizer updates each layer.
  layout = afo.nnx.curvature_layout(grad_fn, model, x)
  assert layout['blocks']['dense'].input_sums[0].shape == (3, 6)
  params = []
  for tx in (afo.adafisher(0.1, t_cov=1, layout=layout), afo.adafisher(0.1)):
    copy = nnx.clone(model)
    optimizer = nnx.Optimizer(copy, tx, wrt=nnx.Param)
    with warnings.catch_warnings():
      warnings.simplefilter('error', afo.UnpreconditionedParametersWarning)
      nnx.jit(lambda m, o, g, c: o.update(m, g, curvature=c))(
        copy, optimizer, grads, curvature
      )
    factors = afo.adafisher_state(optimizer.opt_state).factors
    factors = factors['blocks']['dense']
    assert factors.h.shape == (3, 6) and factors.s.shape == (3, 5)
    params.append(_linen_params(copy))
  _assert_trees_close(*params)


def test_state_axes_must_slice_probes_like_params():
  x = _x(4, 5)
  model = _init(
    lambda: Stack(3, nnx.Rngs(0), state_axes={nnx.Param: 0, ...: None})
  )
  grad_fn = afo.nnx.value_and_grad_with_curvature(lambda m, x: m(x).sum())
  with pytest.raises(afo.CaptureError, match=r'blocks/dense.*Probe'):
    grad_fn(model, x)
  model.state_axes = (((nnx.Param, afo.nnx.Probe), 0), (..., None))
  _, _, curvature = grad_fn(model, x)
  assert curvature['blocks']['dense'].rows.shape == (3,)


class Shared(nnx.Module):
  """One Linear layer reachable under two names, applied twice."""

  def __init__(self, rngs):
    self.layer = nnx.Linear(4, 4, rngs=rngs)
    self.reused = self.layer

  def __call__(self, x):
    return self.reused(jnp.tanh(self.layer(x)))


def test_shared_layer_gives_the_row_weighted_mean():
  model = _init(lambda: Shared(nnx.Rngs(0)))
  x = _x(6, 4)
  readout = _readout(x.shape)
  w, b = model.layer.kernel[...], model.layer.bias[...]

  def loss(perturbations):
    a = jnp.tanh(x @ w + b + perturbations[0])
    return readout(a @ w + b + perturbations[1]), (x, a)

  g, inputs = jax.grad(loss, has_aux=True)([jnp.zeros_like(x)] * 2)
  _, grads, curvature = afo.nnx.value_and_grad_with_curvature(
    lambda m, x: readout(m(x))
  )(model, x)
  assert sorted(curvature) == sorted(grads) == ['layer']  # its first path
  h, s = curvature['layer'].means()
  want_h, want_s = bf.dense(
    np.concatenate(inputs), np.concatenate(g), [1], 1, True
  )
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(s, want_s, **TOL)
  assert float(curvature['layer'].rows) == 12


class _SubLinear(nnx.Linear):
  """A subclass that wraps the base call: statistics stay the layer's own."""

  def __call__(self, x):
    return 2.0 * super().__call__(x)


def test_subclass_is_captured_at_the_base_call():
  layer = _init(lambda: _SubLinear(3, 4, rngs=nnx.Rngs(0)))
  x = _x(5, 3)
  y = layer(x)
  readout = _readout(y.shape)
  _, _, curvature = afo.nnx.value_and_grad_with_curvature(
    lambda m, x: readout(m(x))
  )(layer, x)
  h, s = curvature.means()
  want_h, want_s = bf.dense(x, 2.0 * jax.grad(readout)(y), [1], 1, True)
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(s, want_s, **TOL)
  assert type(layer) is _SubLinear


class Layers(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List(
      [nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)]
    )

  def __call__(self, x):
    return self.layers[1](jnp.tanh(self.layers[0](x)))


def test_list_items_are_keyed_by_index():
  """``nnx.State`` keys list items by int; flattened paths name them '0'."""
  assert afo._tree.get_node({'a': {0: 'leaf'}}, ('a', '0')) == 'leaf'
  model, x = _init(lambda: Layers(nnx.Rngs(0))), _x(6, 3)
  _, grads, curvature = afo.nnx.value_and_grad_with_curvature(
    lambda m, x: jnp.sum(m(x) ** 2)
  )(model, x)
  assert sorted(curvature['layers']) == sorted(grads['layers']) == [0, 1]
  optimizer = nnx.Optimizer(model, afo.adafisher(0.1), wrt=nnx.Param)
  with warnings.catch_warnings():
    warnings.simplefilter('error', afo.UnpreconditionedParametersWarning)
    updates = nnx.jit(lambda m, o, g, c: o.update(m, g, curvature=c))(
      model, optimizer, grads, curvature
    )
  assert sorted(afo.adafisher_state(optimizer.opt_state).factors['layers']) == [
    '0',
    '1',
  ]
  # Preconditioned: F~ = H (x) S + 1e-3 is far from 1.
  kernel = updates['layers'][1]['kernel']
  assert not np.allclose(kernel, -0.1 * grads['layers'][1]['kernel'][...])


class Noisy(nnx.Module):
  """BatchNorm, Dropout and an Rngs argument: state the loss updates."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(5, 6, rngs=rngs)
    self.bn = nnx.BatchNorm(6, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x, rngs):
    h = self.drop(self.bn(jnp.tanh(self.dense(x))))
    return self.head(h + 0.1 * jax.random.normal(rngs.noise(), h.shape))


def test_values_gradients_and_updates_equal_nnx_value_and_grad():
  model, x = _init(lambda: Noisy(nnx.Rngs(0))), _x(8, 5)
  twin, rngs, twin_rngs = nnx.clone(model), nnx.Rngs(noise=1), nnx.Rngs(noise=1)

  def loss_fn(model, x, rngs):
    out = model(x, rngs)
    return jnp.sum(out**2), out.mean()

  (loss, aux), grads, curvature = nnx.jit(
    afo.nnx.value_and_grad_with_curvature(loss_fn, has_aux=True)
  )(model, x, rngs)
  (want_loss, want_aux), want_grads = nnx.jit(
    nnx.value_and_grad(loss_fn, has_aux=True)
  )(twin, x, twin_rngs)
  np.testing.assert_allclose(loss, want_loss, **TOL)
  np.testing.assert_allclose(aux, want_aux, **TOL)
  assert type(grads) is type(want_grads)
  assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
  _assert_trees_close(grads, want_grads)
  _assert_trees_close(nnx.state(model), nnx.state(twin))  # batch stats, RNGs
  _assert_trees_close(nnx.state(rngs), nnx.state(twin_rngs))
  assert sorted(curvature) == ['bn', 'dense', 'head']


# --- reporting and misuse ---------------------------------------------------


class TiedGPT(nnx.Module):
  """A GPT-style model: one ``nnx.Embed`` for the lookup and the output."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(11, 4, dtype=jnp.float64, rngs=rngs)
    self.ln = nnx.LayerNorm(4, rngs=rngs)
    self.mix = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, ids):
    h = self.embed(ids)
    h = h + self.mix(self.ln(h))
    return self.embed.attend(jnp.tanh(h))


def test_tied_embedding_gets_lookup_and_attend_statistics():
  model = _init(lambda: TiedGPT(nnx.Rngs(0)))
  ids = jnp.array([[1, 2, 3, 0], [4, 5, 1, 10]])
  readout = _readout(ids.shape + (11,))
  grad_fn = afo.nnx.value_and_grad_with_curvature(
    lambda m, ids: readout(m(ids))
  )
  _, _, curvature = nnx.jit(grad_fn)(model, ids)
  attend, lookup = curvature['embed']  # sorted by rule name
  assert (attend.rule, lookup.rule) == ('attend', 'embed')
  assert lookup.weight_name == attend.weight_name == 'embedding'
  want_lookup, want_attend = bf.tied_embedding(
    model.embed.embedding[...],
    lambda h: model.mix(model.ln(h)),
    ids,
    _x(*ids.shape, 11, seed=7),
  )
  for got, want in ((lookup, want_lookup), (attend, want_attend)):
    for a, b in zip(got.means(), want):
      np.testing.assert_allclose(a, b, **TOL)
  layout = afo.nnx.curvature_layout(grad_fn, model, ids)
  assert [s.rule for s in layout['embed']] == ['attend', 'embed']
  # The optimizer preconditions the table with both contributions.
  optimizer = nnx.Optimizer(
    model, afo.adafisher(1e-3, t_cov=1, layout=layout), wrt=nnx.Param
  )
  with warnings.catch_warnings():
    warnings.simplefilter('error', afo.UnpreconditionedParametersWarning)
    _, grads, curvature = grad_fn(model, ids)
    optimizer.update(model, grads, curvature=curvature)
  report = afo.diagnostics(optimizer.opt_state, nnx.state(model, nnx.Param))
  assert report.layers['embed'].rule == 'attend+embed'
  assert report.layers['embed'].refreshes == 1
  assert report.unpreconditioned == []


class Unsupported(nnx.Module):
  """A circular ConvTranspose and an RMSNorm given a mask (positionally)."""

  def __init__(self, rngs):
    self.mix = nnx.Linear(4, 4, rngs=rngs)
    self.up = nnx.ConvTranspose(4, 4, 3, padding='CIRCULAR', rngs=rngs)
    self.norm = nnx.RMSNorm(4, rngs=rngs)

  def __call__(self, x):
    h = self.mix(x)
    masked = self.norm(h, jnp.arange(4) > 0)
    return self.up(h).sum() + masked.sum()


def test_unsupported_applications_are_reported_and_left_unpreconditioned():
  model = _init(lambda: Unsupported(nnx.Rngs(0)))
  x = _x(2, 5, 4)
  grad_fn = afo.nnx.value_and_grad_with_curvature(lambda m, x: m(x) ** 2)
  reported = r'(?=.*up \(ConvTranspose: .*CIRCULAR)'
  reported += r'(?=.*norm \(RMSNorm: .*mask)'
  with pytest.warns(afo.UnsupportedLayerWarning, match=reported):
    _, grads, curvature = nnx.jit(grad_fn)(model, x)
  assert sorted(curvature) == ['mix']
  assert afo.unpreconditioned_parameters(_linen_params(model), curvature) == [
    'norm/scale',
    'up/bias',
    'up/kernel',
  ]
  optimizer = nnx.Optimizer(model, afo.adafisher(0.1), wrt=nnx.Param)
  with pytest.warns(afo.UnpreconditionedParametersWarning, match='up/kernel'):
    updates = nnx.jit(lambda m, o, g, c: o.update(m, g, curvature=c))(
      model, optimizer, grads, curvature
    )
  np.testing.assert_allclose(
    updates['up']['kernel'], -0.1 * grads['up']['kernel'][...], rtol=1e-6
  )


class Bare(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.ones(3))

  def __call__(self, x):
    return x * self.w


def test_a_model_without_a_capturable_layer_gives_no_curvature_as_linen():
  """Custom parameters only: the gradients of ``nnx.value_and_grad``, an
  empty curvature (as linen's), and the optimizer names what it cannot
  precondition."""
  x = _x(2, 3)
  bare = Bare()
  loss = lambda m, x: (m(x) ** 2).sum()  # noqa: E731
  value, grads, curvature = afo.nnx.value_and_grad_with_curvature(loss)(bare, x)
  want_value, want_grads = nnx.value_and_grad(loss)(bare, x)
  assert curvature == {}
  np.testing.assert_array_equal(value, want_value)
  np.testing.assert_array_equal(grads['w'][...], want_grads['w'][...])
  optimizer = nnx.Optimizer(bare, afo.adafisher(1e-3, t_cov=1), wrt=nnx.Param)
  with pytest.warns(afo.UnpreconditionedParametersWarning, match=': w'):
    optimizer.update(bare, grads, curvature=curvature)


def test_misuse_raises_clear_errors():
  x = _x(2, 5)
  model = _init(lambda: NNXMLP(5, nnx.Rngs(0)))
  with pytest.raises(afo.CaptureError, match=r'none of the model.*dense0'):
    afo.nnx.value_and_grad_with_curvature(lambda m, x: x.sum())(model, x)
  with pytest.raises(TypeError, match=r'nnx\.Module'):
    afo.nnx.value_and_grad_with_curvature(lambda m, x: m(x).sum())(
      nnx.state(model), x
    )
  with pytest.raises(TypeError, match='fisher_key'):
    afo.nnx.value_and_grad_with_curvature(lambda m, x: m(x).sum())(
      model, x, fisher_key=jax.random.key(0)
    )
  with pytest.raises(ValueError, match='fisher'):
    afo.nnx.value_and_grad_with_curvature(lambda m: 0.0, fisher='true')


def test_import_does_not_load_flax_nnx():
  code = (
    'import sys, adafisher_optax as afo; '
    "assert 'flax.nnx' not in sys.modules; "
    'afo.nnx.value_and_grad_with_curvature; '
    "assert 'flax.nnx' in sys.modules"
  )
  subprocess.run([sys.executable, '-c', code], check=True)


def test_helpers_accept_what_nnx_hands_out():
  """nnx.state(model, nnx.Param), NNX grads and an nnx.Optimizer's state."""
  model = _init(lambda: NNXConvNet(2, nnx.Rngs(0)))
  x, y = _batch(0, (4, 6, 6, 2))
  optimizer = nnx.Optimizer(model, afo.adafisher(0.05), wrt=nnx.Param)
  grad_fn = afo.nnx.value_and_grad_with_curvature(_nnx_loss)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    _, grads, curvature = grad_fn(model, x, y)
    optimizer.update(model, grads, curvature=curvature)
    return grads, curvature

  grads, curvature = train_step(model, optimizer, x, y)
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  assert afo.unpreconditioned_parameters(state, curvature) == []
  assert afo.unpreconditioned_parameters(grads, curvature) == []
  assert afo.unpreconditioned_parameters(pure, curvature) == []
  report = afo.diagnostics(optimizer.opt_state, state)
  want = afo.diagnostics(optimizer.opt_state, pure)
  assert report == want
  assert sorted(report.layers) == ['conv', 'gn', 'head', 'ln']
  assert report.unpreconditioned == [] and report.count == 1


class NNXProjection(nnx.Module):
  """A user's own NNX layer: ``x @ w + b`` with its own parameter names."""

  def __init__(self, d_in, d_out, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (d_in, d_out)))
    self.b = nnx.Param(jnp.zeros(d_out))

  def __call__(self, x):
    return x @ self.w[...] + self.b[...]


afo.register_layer(
  NNXProjection,
  afo.rules.DENSE,
  lambda layer, x, kwargs: afo.rules.Dense(),
  weight='w',
  bias='b',
)


class _NNXNamedW(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (5, 4)))

  def __call__(self, x):
    return x @ self.w[...]


def test_registered_nnx_weight_name_the_layer_does_not_have():
  """As in linen: the layer's own parameters are named, not skipped."""
  afo.register_layer(
    _NNXNamedW, afo.rules.DENSE, lambda m, x, k: afo.rules.Dense(), bias=None
  )  # weight='kernel' by default; the layer calls it w
  model = _NNXNamedW(nnx.Rngs(0))
  grad_fn = afo.nnx.value_and_grad_with_curvature(lambda m, x: m(x).sum())
  with pytest.raises(
    afo.CaptureError, match=r"has no parameter 'kernel' \(its parameters: w\)"
  ):
    grad_fn(model, jnp.ones((3, 5)))


def test_registered_nnx_layer_type_gives_brute_force_statistics():
  layer = _init(lambda: NNXProjection(5, 4, nnx.Rngs(0)))
  x = _x(3, 6, 5)
  y = layer(x)
  readout = _readout(y.shape)
  _, _, curvature = afo.nnx.value_and_grad_with_curvature(
    lambda m, x: readout(m(x))
  )(layer, x)
  h, s = curvature.means()
  want_h, want_s = bf.dense(x, jax.grad(readout)(y), [2], 1, True)
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(s, want_s, **TOL)


class Monotone(nnx.Linear):
  """Overrides ``__call__`` without calling ``nnx.Linear.__call__``."""

  def __call__(self, x):
    return x @ jnp.abs(self.kernel[...]) + self.bias[...]


class WithMonotone(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(5, 4, rngs=rngs)
    self.monotone = Monotone(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.monotone(jnp.tanh(self.dense(x)))


def test_subclass_that_bypasses_its_base_is_reported_and_the_rest_captured():
  model = _init(lambda: WithMonotone(nnx.Rngs(0)))
  x = _x(3, 5)
  grad_fn = afo.nnx.value_and_grad_with_curvature(lambda m, x: m(x).sum())
  with pytest.warns(
    afo.UnsupportedLayerWarning,
    match=r'monotone \(Monotone: its __call__ does not call Linear',
  ):
    _, _, curvature = grad_fn(model, x)
  assert sorted(curvature) == ['dense']
  with warnings.catch_warnings():
    warnings.simplefilter('error', afo.UnsupportedLayerWarning)
    _, _, excluded = afo.nnx.value_and_grad_with_curvature(
      lambda m, x: m(x).sum(), exclude=(Monotone,)
    )(model, x)
  _assert_same_statistics(excluded['dense'], curvature['dense'])


@pytest.mark.parametrize('cell', [nnx.LSTMCell, nnx.OptimizedLSTMCell])
def test_lstm_cells_are_preconditioned(cell):
  model = _init(
    lambda: nnx.RNN(cell(5, 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
  )
  xs = _x(2, 4, 5)
  grad_fn = afo.nnx.value_and_grad_with_curvature(lambda m, xs: m(xs).sum())
  _, grads, curvature = grad_fn(model, xs)
  assert afo.unpreconditioned_parameters(grads, curvature) == []


def test_an_optimizer_with_a_wrt_filter_takes_the_whole_curvature():
  """nnx.Optimizer(wrt=...) filters the grads, not the curvature: the
  frozen layer's statistics are left out, as if filtered by hand."""
  x = _x(8, 5)
  y = jnp.arange(8) % 3
  head_only = nnx.All(nnx.Param, nnx.PathContains('head'))
  grad_fn = afo.nnx.value_and_grad_with_curvature(
    lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(
      m(x), y
    ).mean()
  )

  def train(by_hand):
    model = NNXMLP(5, nnx.Rngs(0), widths=(16,))
    hidden = model.dense0.kernel[...]
    optimizer = nnx.Optimizer(
      model, afo.adafisher(1e-2, t_cov=1), wrt=head_only
    )

    @nnx.jit
    def step(model, optimizer, x, y):
      _, grads, curvature = grad_fn(model, x, y)
      if by_hand:
        curvature = {'head': curvature['head']}
      optimizer.update(model, grads, curvature=curvature)

    for _ in range(3):
      step(model, optimizer, x, y)
    np.testing.assert_array_equal(model.dense0.kernel[...], hidden)
    return model.head.kernel[...]

  np.testing.assert_array_equal(train(False), train(True))


class _FrozenVariable(nnx.Variable):
  pass


@pytest.mark.parametrize('frozen', ['bias', 'kernel'])
def test_a_layer_with_a_frozen_parameter(frozen):
  """A bias frozen as another Variable type is a constant: the kernel is
  captured (its statistics without the bias entry) and preconditioned. A
  frozen kernel leaves the layer uncaptured, reported, its bias at F~ = 1."""
  x = _x(8, 5)
  y = jnp.arange(8) % 3
  model = NNXMLP(5, nnx.Rngs(0), widths=(16,))
  layer = model.dense0
  setattr(layer, frozen, _FrozenVariable(getattr(layer, frozen)[...]))
  kept = getattr(layer, frozen)[...]
  grad_fn = afo.nnx.value_and_grad_with_curvature(
    lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(
      m(x), y
    ).mean()
  )
  optimizer = nnx.Optimizer(model, afo.adafisher(1e-2, t_cov=1), wrt=nnx.Param)
  if frozen == 'bias':
    _, grads, curvature = grad_fn(model, x, y)
    np.testing.assert_allclose(
      curvature['dense0'].input_sums[0], jnp.sum(x * x, 0), rtol=1e-6
    )
    with warnings.catch_warnings():
      warnings.simplefilter('error')
      optimizer.update(model, grads, curvature=curvature)
    assert afo.adafisher_state(optimizer.opt_state).factors[
      'dense0'
    ].h.shape == (5,)
  else:
    with pytest.warns(
      afo.UnsupportedLayerWarning, match="'kernel' is not trained"
    ):
      _, grads, curvature = grad_fn(model, x, y)
    assert sorted(curvature) == ['head']
    with pytest.warns(
      afo.UnpreconditionedParametersWarning, match='dense0/bias'
    ):
      optimizer.update(model, grads, curvature=curvature)
  np.testing.assert_array_equal(getattr(layer, frozen)[...], kept)


def test_lora_linear_is_preconditioned_with_a_layout():
  """nnx.LoRALinear holds its lora module's params: the factors are sized
  from a layout (without one the error names the case); its kernel and bias
  are preconditioned, the LoRA matrices get F~ = 1."""
  x = _x(8, 5)
  model = nnx.LoRALinear(5, 3, lora_rank=2, rngs=nnx.Rngs(0))
  grad_fn = afo.nnx.value_and_grad_with_curvature(
    lambda m, x: (m(x) ** 2).mean()
  )
  _, grads, curvature = grad_fn(model, x)
  guessed = nnx.Optimizer(model, afo.adafisher(1e-3), wrt=nnx.Param)
  with pytest.raises(ValueError, match="LoRALinear's lora"):
    guessed.update(model, grads, curvature=curvature)
  layout = afo.nnx.curvature_layout(grad_fn, model, x)
  optimizer = nnx.Optimizer(
    model, afo.adafisher(1e-3, layout=layout), wrt=nnx.Param
  )
  with pytest.warns(afo.UnpreconditionedParametersWarning, match='lora/lora_a'):
    optimizer.update(model, grads, curvature=curvature)
  factors = afo.adafisher_state(optimizer.opt_state).factors
  assert int(factors.refreshes) == 1 and factors.h.shape == (6,)


def test_an_input_given_by_name_is_captured_as_by_position():
  class ByKeyword(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(7, 4, rngs=rngs)
      self.dense = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, ids, keyword):
      h = self.embed(inputs=ids) if keyword else self.embed(ids)
      h = self.dense(inputs=h) if keyword else self.dense(h)
      return self.embed.attend(query=h) if keyword else self.embed.attend(h)

  model = ByKeyword(nnx.Rngs(0))
  ids = jnp.array([[1, 2, 3], [4, 5, 6]])

  def curvature(keyword):
    def loss(model):
      return jnp.mean(model(ids, keyword) ** 2)

    with warnings.catch_warnings():
      warnings.simplefilter('error', afo.UnsupportedLayerWarning)
      return afo.nnx.value_and_grad_with_curvature(loss)(model)[2]

  by_name, by_position = curvature(True), curvature(False)
  assert set(by_name) == {'embed', 'dense'}
  jax.tree.map(np.testing.assert_array_equal, by_name, by_position)
