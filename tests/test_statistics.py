"""Captured statistics equal brute force (float64) for every supported layer."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adafisher_optax as afo

import brute_force as bf

pytestmark = pytest.mark.usefixtures('x64')
TOL = dict(rtol=1e-11, atol=1e-14)


def _readout(y):
  r = jax.random.normal(jax.random.key(7), y.shape, y.dtype)
  return lambda out: jnp.sum(jnp.sin(out) * r)


def capture_layer(layer, x, *, numerics='reference', mutable=(), **call_kwargs):
  """Captures ``layer`` alone under ``loss = sum(sin(y) * r)``.

  Parameters are made float64 (perturbed from their init). Returns
  ``(H_hat, S_hat, y, g, variables)`` with ``g = dL/dy``.
  """
  variables = layer.init(jax.random.key(0), x, **call_kwargs)
  variables = jax.tree.map(
    lambda v: (
      v.astype(jnp.float64)
      + 0.1 * jax.random.normal(jax.random.key(1), v.shape, jnp.float64)
      if jnp.issubdtype(v.dtype, jnp.floating)
      else v
    ),
    variables,
  )
  rest = {k: v for k, v in variables.items() if k != 'params'}

  def forward(p, x):
    out = layer.apply(
      {'params': p, **rest}, x, mutable=list(mutable) or False, **call_kwargs
    )
    return out[0] if mutable else out

  y = forward(variables['params'], x)
  readout = _readout(y)
  grad_fn = afo.value_and_grad_with_curvature(
    lambda p, x: readout(forward(p, x))
  )
  loss, grads, curvature = jax.jit(grad_fn)(variables['params'], x)
  np.testing.assert_allclose(loss, readout(y), rtol=1e-12)
  want = jax.grad(lambda p: readout(forward(p, x)))(variables['params'])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, **TOL), grads, want
  )
  (stats,) = jax.tree.leaves(
    curvature, is_leaf=lambda n: isinstance(n, afo.LayerStatistics)
  )
  h, s = stats.means(numerics)
  assert h.dtype == s.dtype == jnp.float64
  return np.asarray(h), np.asarray(s), y, jax.grad(readout)(y), variables


def _x(*shape, seed=3):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


@pytest.mark.parametrize('shape', [(6, 5), (3, 4, 5)])
@pytest.mark.parametrize('use_bias', [True, False])
def test_dense(shape, use_bias):
  x = _x(*shape)
  h, s, _, g, _ = capture_layer(nn.Dense(4, use_bias=use_bias), x)
  want_h, want_s = bf.dense(x, g, [x.ndim - 1], 1, use_bias)
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(s, want_s, **TOL)


def test_dense_output_statistic_equals_per_example_bias_gradients():
  """``S`` is the mean squared per-example bias gradient (vmap brute force)."""
  x = _x(7, 5)
  layer = nn.Dense(3)
  _, s, y, _, variables = capture_layer(layer, x)
  readout = _readout(y)

  def example_loss(p, xi, ri):
    return jnp.sum(jnp.sin(layer.apply({'params': p}, xi)) * ri)

  r = jax.random.normal(jax.random.key(7), y.shape, y.dtype)
  assert jnp.allclose(readout(y), jnp.sum(jnp.sin(y) * r))
  per_example = jax.vmap(jax.grad(example_loss), (None, 0, 0))(
    variables['params'], x, r
  )
  np.testing.assert_allclose(s, (per_example['bias'] ** 2).mean(0), **TOL)


@pytest.mark.parametrize(
  'shape,axis,features',
  [
    ((4, 3, 5), -1, (2, 3)),
    ((4, 3, 5), (-2, -1), 6),
    ((4, 3, 5, 2), (1, 3), (3, 2)),
  ],
)
@pytest.mark.parametrize('use_bias', [True, False])
def test_dense_general(shape, axis, features, use_bias):
  x = _x(*shape)
  layer = nn.DenseGeneral(features, axis=axis, use_bias=use_bias)
  h, s, _, g, _ = capture_layer(layer, x)
  contracted = sorted(a % x.ndim for a in np.atleast_1d(axis))
  want_h, want_s = bf.dense(
    x, g, contracted, len(np.atleast_1d(features)), use_bias
  )
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(s, want_s, **TOL)


CONV_CASES = {
  'same': dict(kernel_size=(3, 3)),
  'valid_stride_no_bias': dict(
    kernel_size=(3, 3), strides=2, padding='VALID', use_bias=False
  ),
  'explicit_dilated': dict(
    kernel_size=(3, 2),
    strides=(2, 1),
    padding=((1, 2), (0, 1)),
    kernel_dilation=(2, 1),
  ),
  'circular': dict(kernel_size=(3, 3), padding='CIRCULAR'),
  'reflect_stride': dict(kernel_size=(3, 3), strides=2, padding='REFLECT'),
  'int_padding': dict(kernel_size=(2, 2), padding=1),
  'grouped': dict(kernel_size=(3, 3), feature_group_count=2, features=6),
  'depthwise': dict(kernel_size=(3, 3), feature_group_count=4, features=8),
  'input_dilation': dict(
    kernel_size=(2, 2), input_dilation=2, padding=((1, 1), (0, 1))
  ),
}


@pytest.mark.parametrize('case', sorted(CONV_CASES))
def test_conv_2d(case):
  config = {'features': 5, **CONV_CASES[case]}
  _check_conv(config, _x(3, 7, 6, 4))


@pytest.mark.parametrize(
  'config,shape',
  [
    (
      dict(features=3, kernel_size=(5,), padding='CAUSAL', kernel_dilation=2),
      (2, 11, 3),
    ),
    (dict(features=3, kernel_size=(4,), strides=3), (2, 10, 2)),
    (
      dict(features=2, kernel_size=(2, 3, 2), strides=(1, 2, 1)),
      (2, 4, 5, 3, 2),
    ),
    (dict(features=4, kernel_size=(3, 3)), (2, 3, 6, 5, 2)),  # 2 batch dims
    (dict(features=4, kernel_size=(3, 3), strides=2), (6, 5, 2)),  # unbatched
  ],
)
def test_conv_other_ranks_and_batch_shapes(config, shape):
  _check_conv(config, _x(*shape))


def _check_conv(config, x):
  layer = nn.Conv(**config)
  h, s, y, g, variables = capture_layer(layer, x)
  n_spatial = len(layer.kernel_size)
  n_batch = x.ndim - n_spatial - 1
  flat_x = x.reshape((-1,) + x.shape[n_batch:])

  def to_tuple(v):
    return (v,) * n_spatial if isinstance(v, int) else tuple(v)

  padding = layer.padding
  if isinstance(padding, int):
    padding = [(padding, padding)] * n_spatial
  patches, out = bf.im2col(
    flat_x,
    tuple(layer.kernel_size),
    to_tuple(layer.strides),
    padding,
    to_tuple(layer.input_dilation),
    to_tuple(layer.kernel_dilation),
  )
  groups = layer.feature_group_count
  params = variables['params']
  np.testing.assert_allclose(  # the brute force itself is right
    bf.conv_output(patches, params['kernel'], params.get('bias'), groups, out),
    y.reshape((-1,) + y.shape[n_batch:]),
    **TOL,
  )
  want_h, want_s = bf.conv(patches, g, groups, layer.use_bias)
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(s, want_s, **TOL)


CONV_TRANSPOSE_CASES = {
  'same_stride_2': (dict(kernel_size=(3, 3), strides=(2, 2)), (2, 4, 3, 3)),
  'same_kernel_below_stride': (
    dict(kernel_size=(2, 2), strides=(3, 2)),
    (2, 3, 3, 2),
  ),
  'valid_dilated': (
    dict(kernel_size=(3,), strides=(2,), padding='VALID', kernel_dilation=2),
    (2, 5, 3),
  ),
  'explicit_no_bias': (
    dict(
      kernel_size=(3, 2),
      strides=(2, 1),
      padding=((1, 2), (0, 1)),
      use_bias=False,
    ),
    (2, 4, 3, 2),
  ),
  'unbatched': (dict(kernel_size=(3,), strides=(2,)), (5, 2)),
}


@pytest.mark.parametrize('case', sorted(CONV_TRANSPOSE_CASES))
def test_conv_transpose(case):
  """A transposed conv is a stride-1 conv of the input dilated by the
  strides: its im2col patches reproduce the layer's output exactly."""
  config, shape = CONV_TRANSPOSE_CASES[case]
  layer = nn.ConvTranspose(features=4, **config)
  x = _x(*shape)
  h, s, y, g, variables = capture_layer(layer, x)
  conv = afo.flax_adapters.conv_transpose_config(layer, x, {})
  n_spatial = len(conv.kernel_size)
  flat_x = x.reshape((-1,) + x.shape[x.ndim - n_spatial - 1 :])
  patches, out = bf.im2col(
    flat_x,
    conv.kernel_size,
    conv.strides,
    conv.padding,
    conv.input_dilation,
    conv.kernel_dilation,
  )
  params = variables['params']
  np.testing.assert_allclose(
    bf.conv_output(patches, params['kernel'], params.get('bias'), 1, out),
    y.reshape((-1,) + y.shape[y.ndim - n_spatial - 1 :]),
    **TOL,
  )
  want_h, want_s = bf.conv(patches, g, 1, layer.use_bias)
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(s, want_s, **TOL)


def test_conv_transpose_that_is_not_a_dilated_conv_is_reported():
  layer = nn.ConvTranspose(3, (3,), strides=(2,), padding='CIRCULAR')
  x = _x(2, 5, 2)
  params = layer.init(jax.random.key(0), x)['params']
  grad_fn = afo.value_and_grad_with_curvature(
    lambda p, x: jnp.sum(layer.apply({'params': p}, x) ** 2)
  )
  with pytest.warns(afo.UnsupportedLayerWarning, match='CIRCULAR'):
    _, _, curvature = grad_fn(params, x)
  assert curvature == {}


def test_a_layer_without_params_is_not_a_layer_elsewhere():
  """The only registered layer has no params (a LayerNorm without scale and
  bias): no curvature, as for a model with no capturable layer, not "the
  params of these layers are not arrays of the first argument"."""
  norm = nn.LayerNorm(use_scale=False, use_bias=False)
  x = jnp.ones((4, 5)) * jnp.arange(5.0)

  def loss(p, x):
    return jnp.sum(norm.apply({}, x) @ p['w'])

  _, grads, curvature = afo.value_and_grad_with_curvature(loss)(
    {'w': jnp.ones((5, 2))}, x
  )
  assert curvature == {}
  np.testing.assert_allclose(
    grads['w'], jax.grad(loss)({'w': jnp.ones((5, 2))}, x)['w']
  )


def test_embed():
  ids = jnp.array([[0, 3, 3, 1], [5, 3, 0, 0]])
  layer = nn.Embed(7, 4)
  h, s, _, g, _ = capture_layer(layer, ids)
  want_h, want_s = bf.embed(ids, g, 7)
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(s, want_s, **TOL)


NORMS = {
  'layer_norm_3d': (nn.LayerNorm(), (3, 4, 5), {}),
  'layer_norm_2d': (nn.LayerNorm(use_bias=False), (6, 5), {}),
  'layer_norm_two_feature_axes': (
    nn.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1)),
    (3, 4, 5),
    {},
  ),
  'rms_norm': (nn.RMSNorm(), (3, 4, 5), {}),
  'batch_norm_train': (
    nn.BatchNorm(use_running_average=False),
    (4, 3, 3, 5),
    dict(mutable=('batch_stats',)),
  ),
  'batch_norm_eval': (nn.BatchNorm(use_running_average=True), (4, 3, 5), {}),
  'group_norm': (nn.GroupNorm(num_groups=2), (3, 4, 4, 6), {}),
}


def _x_hat(layer, x, variables):
  eps = layer.epsilon
  if isinstance(layer, nn.LayerNorm):
    return bf.layer_norm_x_hat(
      x, tuple(np.atleast_1d(layer.reduction_axes)), eps
    )
  if isinstance(layer, nn.RMSNorm):
    return bf.rms_norm_x_hat(x, (-1,), eps)
  if isinstance(layer, nn.GroupNorm):
    return bf.group_norm_x_hat(x, layer.num_groups, eps)
  if layer.use_running_average:
    stats = variables['batch_stats']
    return (x - stats['mean']) / np.sqrt(stats['var'] + eps)
  axes = tuple(range(x.ndim - 1))
  return (x - x.mean(axes)) / np.sqrt(x.var(axes) + eps)


@pytest.mark.parametrize('name', sorted(NORMS))
@pytest.mark.parametrize('numerics', ['reference', 'paper'])
def test_norms(name, numerics):
  layer, shape, kwargs = NORMS[name]
  x = np.asarray(_x(*shape)) * 1.7 + 0.3
  h, s, _, g, variables = capture_layer(
    layer, jnp.asarray(x), numerics=numerics, **kwargs
  )
  feature_axes = (
    (x.ndim - 2, x.ndim - 1)
    if name == 'layer_norm_two_feature_axes'
    else (x.ndim - 1,)
  )
  if numerics == 'paper':
    want_h, want_s = bf.norm_paper(_x_hat(layer, x, variables), g, feature_axes)
  else:
    k = 1 if isinstance(layer, (nn.LayerNorm, nn.RMSNorm)) else x.ndim - 1
    want_h, want_s = bf.norm_reference(x, g, k, feature_axes)
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(s, want_s, **TOL)


class _SubDense(nn.Dense):
  """A subclass that wraps the base call: statistics stay the layer's own."""

  def __call__(self, x):
    return 2.0 * super().__call__(x)


def test_subclass_is_captured_at_the_base_call():
  x = _x(5, 3)
  layer = _SubDense(4)
  h, s, _y, g, _ = capture_layer(layer, x)
  want_h, want_s = bf.dense(x, 2.0 * g, [1], 1, True)  # g of the Dense output
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(s, want_s, **TOL)


# --- several applications: shared modules, remat, scan ----------------------


class _Cell(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return jnp.tanh(nn.Dense(carry.shape[-1], name='dense')(carry)), None


def _manual_chain(x, kernels, biases, readout_shape):
  """``x_{l+1} = tanh(x_l W_l + b_l)``; returns ``(z inputs, g per layer)``."""
  r = jax.random.normal(jax.random.key(7), readout_shape, x.dtype)

  def loss(perturbations):
    inputs, h = [], x
    for w, b, p in zip(kernels, biases, perturbations):
      inputs.append(h)
      h = jnp.tanh(h @ w + b + p)
    return jnp.sum(jnp.sin(h) * r), inputs

  zeros = [jnp.zeros(x.shape[:-1] + (w.shape[1],)) for w in kernels]
  g, inputs = jax.grad(loss, has_aux=True)(zeros)
  return inputs, g, lambda out: jnp.sum(jnp.sin(out) * r)


@pytest.mark.parametrize('remat', [False, True])
def test_scan_stacked_layers_get_per_layer_statistics(remat):
  cell = nn.remat(_Cell) if remat else _Cell
  model = nn.scan(
    cell, variable_axes={'params': 0}, split_rngs={'params': True}, length=3
  )()
  x = _x(4, 5)
  params = model.init(jax.random.key(0), x, None)['params']
  kernels = params['dense']['kernel']
  biases = params['dense']['bias']
  assert kernels.shape == (3, 5, 5)
  inputs, g, readout = _manual_chain(x, kernels, biases, x.shape)
  grad_fn = afo.value_and_grad_with_curvature(
    lambda p, x: readout(model.apply({'params': p}, x, None)[0])
  )
  _, _, curvature = jax.jit(grad_fn)(params, x)
  h, s = curvature['dense'].means()
  assert h.shape == (3, 6) and s.shape == (3, 5)
  for layer in range(3):
    want_h, want_s = bf.dense(inputs[layer], g[layer], [1], 1, True)
    np.testing.assert_allclose(h[layer], want_h, **TOL)
    np.testing.assert_allclose(s[layer], want_s, **TOL)


def test_scan_shared_weights_give_row_weighted_mean():
  model = nn.scan(
    _Cell, variable_broadcast='params', split_rngs={'params': False}, length=4
  )()
  x = _x(3, 5)
  params = model.init(jax.random.key(0), x, None)['params']
  w, b = params['dense']['kernel'], params['dense']['bias']
  inputs, g, readout = _manual_chain(x, [w] * 4, [b] * 4, x.shape)
  grad_fn = afo.value_and_grad_with_curvature(
    lambda p, x: readout(model.apply({'params': p}, x, None)[0])
  )
  _, _, curvature = jax.jit(grad_fn)(params, x)
  h, s = curvature['dense'].means()
  want_h, want_s = bf.dense(
    np.concatenate(inputs), np.concatenate(g), [1], 1, True
  )
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(s, want_s, **TOL)
  assert float(curvature['dense'].rows) == 12


class _Shared(nn.Module):
  """One Dense applied to inputs with different row counts."""

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(4, name='shared')
    a = jnp.tanh(dense(x))  # rows: 6
    b = jnp.tanh(dense(a.reshape(2, 3, 4)))  # rows: 6, 3-D
    c = dense(b[:, :1])  # rows: 2
    return jnp.concatenate([a.reshape(-1), b.reshape(-1), c.reshape(-1)])


def test_shared_module_gives_row_weighted_mean():
  model = _Shared()
  x = _x(6, 4)
  params = model.init(jax.random.key(0), x)['params']
  w, bias = params['shared']['kernel'], params['shared']['bias']
  r = jax.random.normal(jax.random.key(7), (6 * 4 + 6 * 4 + 2 * 4,))

  def loss(perturbations):
    za = x @ w + bias + perturbations[0]
    a = jnp.tanh(za)
    zb = a.reshape(2, 3, 4) @ w + bias + perturbations[1]
    b = jnp.tanh(zb)
    zc = b[:, :1] @ w + bias + perturbations[2]
    out = jnp.concatenate([a.reshape(-1), b.reshape(-1), zc.reshape(-1)])
    return jnp.sum(jnp.sin(out) * r), (x, a.reshape(2, 3, 4), b[:, :1])

  zeros = [jnp.zeros((6, 4)), jnp.zeros((2, 3, 4)), jnp.zeros((2, 1, 4))]
  g, inputs = jax.grad(loss, has_aux=True)(zeros)
  grad_fn = afo.value_and_grad_with_curvature(
    lambda p, x: jnp.sum(jnp.sin(model.apply({'params': p}, x)) * r)
  )
  _, _, curvature = jax.jit(grad_fn)(params, x)
  h, s = curvature['shared'].means()

  def flat(vs):
    return np.concatenate([np.asarray(v).reshape(-1, 4) for v in vs])

  want_h, want_s = bf.dense(flat(inputs), flat(g), [1], 1, True)
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(s, want_s, **TOL)
  assert float(curvature['shared'].rows) == 6 + 6 + 2


def test_low_precision_activations_give_float32_statistics():
  with jax.enable_x64(False):
    layer = nn.Dense(4, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (8, 5)).astype(jnp.bfloat16)
    params = layer.init(jax.random.key(1), x)['params']
    grad_fn = afo.value_and_grad_with_curvature(
      lambda p, x: jnp.sum(
        layer.apply({'params': p}, x).astype(jnp.float32) ** 2
      )
    )
    _, grads, curvature = jax.jit(grad_fn)(params, x)
    stats = curvature
    assert (
      stats.input_sums[0].dtype == stats.output_sums[0].dtype == jnp.float32
    )
    assert grads['kernel'].dtype == jnp.float32
    x32 = np.asarray(x.astype(jnp.float32))
    np.testing.assert_allclose(
      stats.means()[0][:5], (x32**2).mean(0), rtol=1e-6
    )


def test_statistics_rows_and_stack_shapes_are_reported():
  x = _x(2, 3, 5)
  h, s, _, _, _ = capture_layer(nn.Dense(4), x)
  assert h.shape == (6,) and s.shape == (4,)
  assert math.isclose(h[-1], 1.0)


class _TiedGPT(nn.Module):
  """A GPT-style model: one ``nn.Embed`` for the lookup and the output."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(11, 4, name='embed')
    h = embed(ids)
    h = h + nn.Dense(4, name='mix')(nn.LayerNorm(name='ln')(h))
    return embed.attend(jnp.tanh(h))


def test_tied_embedding_gets_lookup_and_attend_statistics():
  model = _TiedGPT()
  ids = jnp.array([[1, 2, 3, 0], [4, 5, 1, 10]])
  params = jax.tree.map(
    lambda p: p.astype(jnp.float64) + 0.1,
    model.init(jax.random.key(0), ids)['params'],
  )
  r = jax.random.normal(jax.random.key(7), ids.shape + (11,), jnp.float64)
  grad_fn = afo.value_and_grad_with_curvature(
    lambda p, ids: jnp.sum(jnp.sin(model.apply({'params': p}, ids)) * r)
  )
  _, _, curvature = jax.jit(grad_fn)(params, ids)
  attend, lookup = curvature['embed']  # sorted by rule name
  assert (attend.rule, lookup.rule) == ('attend', 'embed')
  assert attend.weight_name == lookup.weight_name == 'embedding'
  assert attend.bias_name is None and float(attend.rows) == ids.size

  def mix(h):
    ln = nn.LayerNorm().apply({'params': params['ln']}, h)
    return nn.Dense(4).apply({'params': params['mix']}, ln)

  want_lookup, want_attend = bf.tied_embedding(
    params['embed']['embedding'], mix, ids, r
  )
  for got, want in ((lookup, want_lookup), (attend, want_attend)):
    for a, b in zip(got.means(), want):
      np.testing.assert_allclose(a, b, **TOL)
  layout = afo.curvature_layout(grad_fn, params, ids)
  assert [s.rule for s in layout['embed']] == ['attend', 'embed']
  assert layout['embed'][0].input_sums[0].shape == (4,)
  assert layout['embed'][0].output_sums[0].shape == (11,)


def test_attend_curvature_is_the_transpose_of_a_dense_kernels():
  h, s = jnp.arange(1.0, 4.0), jnp.arange(1.0, 6.0)  # D = 3, V = 5
  k = afo.rules.ATTEND.curvature(h, s, 'reference', 'weight', (5, 3))
  want = afo.rules.DENSE.curvature(h, s, 'reference', 'weight', (3, 5)).T
  np.testing.assert_array_equal(k, want)
  stacked = afo.rules.ATTEND.curvature(
    jnp.stack([h, 2 * h]), jnp.stack([s, s]), 'paper', 'weight', (2, 5, 3)
  )
  np.testing.assert_array_equal(stacked[1], 2 * want)
  assert afo.rules.ATTEND.factor_shapes([(3,)], [(5,)], 'paper') == (
    (3,),
    (5,),
  )
  np.testing.assert_allclose(
    afo.rules.ATTEND.curvature_sum(h, s, 'reference', 'weight', (5, 3)),
    want.sum(),
  )


class _TwiceNormed(nn.Module):
  @nn.compact
  def __call__(self, x):
    norm = nn.LayerNorm(name='ln')
    return norm(jnp.tanh(norm(x)) * 1.5)


@pytest.mark.parametrize('numerics', ['reference', 'paper'])
def test_shared_norm_combines_like_a_concatenated_batch(numerics):
  """Two applications of one LayerNorm: as if their batches were stacked."""
  model = _TwiceNormed()
  x = _x(3, 4, 5) * 2.0
  params = model.init(jax.random.key(0), x)['params']
  params = jax.tree.map(lambda p: p.astype(jnp.float64) + 0.3, params)
  r = jax.random.normal(jax.random.key(7), x.shape, jnp.float64)
  scale, bias = params['ln']['scale'], params['ln']['bias']

  def layer_norm(v):
    mean = v.mean(-1, keepdims=True)
    var = v.var(-1, keepdims=True)
    return (v - mean) / jnp.sqrt(var + 1e-6) * scale + bias

  def loss(perturbations):
    first = layer_norm(x) + perturbations[0]
    second_in = jnp.tanh(first) * 1.5
    out = layer_norm(second_in) + perturbations[1]
    return jnp.sum(jnp.sin(out) * r), (x, second_in)

  g, inputs = jax.grad(loss, has_aux=True)([jnp.zeros_like(x)] * 2)
  grad_fn = afo.value_and_grad_with_curvature(
    lambda p, x: jnp.sum(jnp.sin(model.apply({'params': p}, x)) * r),
  )
  _, _, curvature = jax.jit(grad_fn)(params, x)
  h, s = curvature['ln'].means(numerics)
  stacked_x = np.concatenate([np.asarray(v) for v in inputs])
  stacked_g = np.concatenate([np.asarray(v) for v in g])
  if numerics == 'reference':
    want_h, want_s = bf.norm_reference(stacked_x, stacked_g, 1, (2,))
  else:
    x_hat = bf.layer_norm_x_hat(stacked_x, (-1,), 1e-6)
    want_h, want_s = bf.norm_paper(x_hat, stacked_g, (2,))
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(s, want_s, **TOL)


# --- what the loss sees, and which layers are the model's (issue 12) ---------


def _mlp_problem():
  from models import MLP, batch

  model = MLP()
  x, y = batch(jax.random.key(0), (6, 5))
  x = x.astype(jnp.float64)
  params = jax.tree.map(
    lambda p: p.astype(jnp.float64), model.init(jax.random.key(1), x)['params']
  )
  return model, params, x, y


def _cross_entropy(logits, y):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean()


def test_loss_sees_exactly_the_params_it_was_given():
  """An L2-SP regulariser and a parameter count inside the loss."""
  model, params, x, y = _mlp_problem()
  anchor = jax.tree.map(lambda p: p + 0.1, params)

  def loss(p, x, y):
    drift = jax.tree.map(lambda u, v: u - v, p, anchor)
    count = sum(v.size for v in jax.tree.leaves(p))
    penalty = sum(jnp.sum(d * d) for d in jax.tree.leaves(drift)) / count
    return _cross_entropy(model.apply({'params': p}, x), y) + penalty

  value, grads, curvature = afo.value_and_grad_with_curvature(loss)(
    params, x, y
  )
  want_value, want_grads = jax.value_and_grad(loss)(params, x, y)
  np.testing.assert_allclose(value, want_value, rtol=1e-12)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, **TOL), grads, want_grads
  )
  assert sorted(curvature) == ['dense0', 'dense1', 'head']


@pytest.mark.parametrize('wider', [False, True])
def test_teacher_network_in_the_loss_is_not_captured(wider):
  """Distillation: only the layers on the first argument's arrays count."""
  from models import MLP

  model, params, x, y = _mlp_problem()
  teacher = MLP(widths=(32, 8)) if wider else model
  teacher_params = jax.tree.map(
    lambda p: p.astype(jnp.float64),
    teacher.init(jax.random.key(9), x)['params'],
  )

  def distillation(p, teacher_params, x, y):
    logits = model.apply({'params': p}, x)
    target = jax.nn.softmax(teacher.apply({'params': teacher_params}, x))
    return _cross_entropy(logits, y) - jnp.mean(
      jnp.sum(target * jax.nn.log_softmax(logits), -1)
    )

  _, _, got = afo.value_and_grad_with_curvature(distillation)(
    params, teacher_params, x, y
  )
  target = jax.nn.softmax(teacher.apply({'params': teacher_params}, x))

  def student_only(p, x, y):
    logits = model.apply({'params': p}, x)
    return _cross_entropy(logits, y) - jnp.mean(
      jnp.sum(target * jax.nn.log_softmax(logits), -1)
    )

  _, _, want = afo.value_and_grad_with_curvature(student_only)(params, x, y)
  assert sorted(got) == ['dense0', 'dense1', 'head']
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), got, want)


class _SetupModel(nn.Module):
  """Submodules built in ``setup``, as many models are written."""

  def setup(self):
    self.encoder = nn.Dense(7)
    self.head = nn.Dense(3)

  def __call__(self, x):
    return self.head(jnp.tanh(self.encoder(x)))


@pytest.mark.parametrize('entry', ['method_function', 'nn_apply', 'bind'])
def test_setup_model_entered_through_a_function_is_captured(entry):
  """``setup`` runs through Flax's interceptors; it is not the model's entry
  (taking it for one built the submodules on a clone: AttributeError)."""
  _, _, x, y = _mlp_problem()
  model = _SetupModel()
  params = model.init(jax.random.key(2), x)['params']

  def forward(m, x):
    return m.head(jnp.tanh(m.encoder(x)))

  outputs = {
    'method_function': lambda p, x: model.apply(
      {'params': p}, x, method=forward
    ),
    'nn_apply': lambda p, x: nn.apply(forward, model)({'params': p}, x),
    'bind': lambda p, x: forward(model.bind({'params': p}), x),
  }[entry]

  def loss(p, x, y):
    return _cross_entropy(outputs(p, x), y)

  def by_call(p, x, y):
    return _cross_entropy(model.apply({'params': p}, x), y)

  _, grads, got = afo.value_and_grad_with_curvature(loss)(params, x, y)
  _, want_grads, want = afo.value_and_grad_with_curvature(by_call)(params, x, y)
  assert sorted(got) == ['encoder', 'head']
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), got, want)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, **TOL), grads, want_grads
  )


def test_frozen_dict_params_give_the_dict_statistics():
  from flax.core import freeze, unfreeze

  model, params, x, y = _mlp_problem()

  def loss(p, x, y):
    return _cross_entropy(model.apply({'params': p}, x), y)

  grad_fn = afo.value_and_grad_with_curvature(loss)
  _, grads, got = grad_fn(freeze(params), x, y)
  _, want_grads, want = grad_fn(params, x, y)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), got, want)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, **TOL),
    unfreeze(grads),
    want_grads,
  )


def test_params_cast_inside_the_loss_fall_back_to_paths():
  """No array of the first argument reaches the model: matched by path."""
  model, params, x, y = _mlp_problem()

  def loss(p, x, y):
    p = jax.tree.map(lambda v: v.astype(jnp.float32), p)
    return _cross_entropy(model.apply({'params': p}, x.astype(jnp.float32)), y)

  _, _, got = afo.value_and_grad_with_curvature(loss)(params, x, y)
  _, _, want = afo.value_and_grad_with_curvature(
    lambda p, x, y: _cross_entropy(model.apply({'params': p}, x), y)
  )(params, x, y)
  assert sorted(got) == ['dense0', 'dense1', 'head']
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), got, want
  )


def test_rows_count_examples_of_a_vmapped_model():
  """A loss that jax.vmaps the model per example: rows over the mapped axis."""
  model, params, x, y = _mlp_problem()

  def batched(p, x, y):
    return _cross_entropy(model.apply({'params': p}, x), y)

  def per_example(p, x, y):
    logits = jax.vmap(lambda xi: model.apply({'params': p}, xi))(x)
    return _cross_entropy(logits, y)

  _, _, want = afo.value_and_grad_with_curvature(batched)(params, x, y)
  _, _, got = afo.value_and_grad_with_curvature(per_example)(params, x, y)
  for name in want:
    assert float(got[name].rows) == float(want[name].rows) == 6
    for a, b in zip(got[name].means(), want[name].means()):
      np.testing.assert_allclose(a, b, **TOL)


class _SharedVmap(nn.Module):
  """``nn.vmap`` over a leading axis with shared params."""

  @nn.compact
  def __call__(self, x):
    layer = nn.vmap(
      nn.Dense,
      variable_axes={'params': None},
      split_rngs={'params': False},
      in_axes=0,
    )(4, name='dense')
    return layer(x)


def test_rows_count_the_axis_of_nn_vmap_with_shared_params():
  model = _SharedVmap()
  x = _x(3, 5, 6)  # vmapped over 3, rows 5 each
  params = model.init(jax.random.key(0), x)['params']
  r = jax.random.normal(jax.random.key(7), (3, 5, 4), jnp.float64)

  def loss(p, x):
    return jnp.sum(jnp.sin(model.apply({'params': p}, x)) * r)

  _, _, curvature = afo.value_and_grad_with_curvature(loss)(params, x)
  stats = curvature['dense']
  assert float(stats.rows) == 15
  g = jax.grad(lambda out: jnp.sum(jnp.sin(out) * r))(
    model.apply({'params': params}, x)
  )
  want_h, want_s = bf.dense(x.reshape(15, 6), g.reshape(15, 4), [1], 1, True)
  h, s = stats.means()
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(s, want_s, **TOL)


def test_embed_ids_are_counted_where_their_gradient_goes():
  """``-V <= id < 0`` wraps (as jnp.take does); ids out of range reach no row."""
  ids = jnp.array([[0, -1, 3, -7], [6, 3, 9, -8]])  # V = 7
  layer = nn.Embed(7, 4)
  h, _, _, _, variables = capture_layer(layer, ids)
  table = variables['params']['embedding']
  grad = jax.grad(
    lambda t: jnp.sum(
      layer.apply({'params': {'embedding': t}}, ids)[ids < 7].sum()
    )
  )(table)
  reached = np.asarray(jnp.abs(grad).sum(-1) > 0)
  wrapped = np.where(np.asarray(ids) < 0, np.asarray(ids) + 7, np.asarray(ids))
  counts = np.bincount(wrapped[(wrapped >= 0) & (wrapped < 7)], minlength=7)
  np.testing.assert_allclose(h * ids.size, counts, **TOL)
  assert np.array_equal(counts > 0, reached)


# --- a layer type registered by the user (issue 10) --------------------------


class Projection(nn.Module):
  """A user's own layer: ``x @ w + b`` with its own parameter names."""

  features: int

  @nn.compact
  def __call__(self, x):
    w = self.param(
      'w', nn.initializers.lecun_normal(), (x.shape[-1], self.features)
    )
    b = self.param('b', nn.initializers.normal(), (self.features,))
    return x @ w + b


afo.register_layer(
  Projection,
  afo.rules.DENSE,
  lambda layer, x, kwargs: afo.rules.Dense(),
  weight='w',
  bias='b',
)


def test_registered_layer_type_gives_brute_force_statistics():
  x = _x(3, 4, 5)
  h, s, _, g, _ = capture_layer(Projection(6), x)
  want_h, want_s = bf.dense(x, g, [2], 1, True)
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(s, want_s, **TOL)


def test_registered_layer_type_is_preconditioned():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Projection(3, name='proj')(
        jnp.tanh(Projection(4, name='hidden')(x))
      )

  model = Model()
  x = _x(6, 5)
  params = model.init(jax.random.key(0), x)['params']
  grad_fn = afo.value_and_grad_with_curvature(
    lambda p, x: jnp.sum(model.apply({'params': p}, x) ** 2)
  )
  _, grads, curvature = grad_fn(params, x)
  tx = afo.adafisher(1e-3, layout=afo.curvature_layout(grad_fn, params, x))
  state = tx.init(params)
  _, state = tx.update(grads, state, params, curvature=curvature)
  report = afo.diagnostics(state, params)
  assert report.unpreconditioned == []
  assert report.layers['proj'].parameters == ('w', 'b')


# --- recurrent cells: the gates' Dense layers (issue 18) ---------------------


class _Recurrent(nn.Module):
  cell: type

  @nn.compact
  def __call__(self, xs):
    return nn.RNN(self.cell(3, param_dtype=jnp.float64), name='rnn')(xs)


def _manual_lstm(params, xs, r):
  """Unrolled LSTM; ``(inputs, hidden inputs, g per gate)`` over all steps."""
  batch, steps, _ = xs.shape

  def loss(perturbations):
    c = h = jnp.zeros((batch, 3))
    outs, hiddens = [], []
    for t in range(steps):
      hiddens.append(h)
      pre = {
        gate: xs[:, t] @ params['i' + gate]['kernel']
        + h @ params['h' + gate]['kernel']
        + params['h' + gate]['bias']
        + perturbations[gate][t]
        for gate in 'ifgo'
      }
      i, f, o = (jax.nn.sigmoid(pre[k]) for k in 'ifo')
      c = f * c + i * jnp.tanh(pre['g'])
      h = o * jnp.tanh(c)
      outs.append(h)
    return jnp.sum(jnp.sin(jnp.stack(outs, 1)) * r), jnp.stack(hiddens, 1)

  zeros = {gate: jnp.zeros((steps, batch, 3)) for gate in 'ifgo'}
  g, hiddens = jax.grad(loss, has_aux=True)(zeros)
  return hiddens, {k: jnp.swapaxes(v, 0, 1) for k, v in g.items()}


@pytest.mark.parametrize('cell', [nn.LSTMCell, nn.OptimizedLSTMCell])
def test_lstm_cells_capture_their_gates_dense_layers(cell):
  """``OptimizedLSTMCell`` fuses its kernels; inside a capture it runs as the
  parameter-compatible ``LSTMCell``, whose gates are ``nn.Dense``."""
  model = _Recurrent(cell)
  xs = _x(2, 4, 5)
  params = model.init(jax.random.key(0), xs)['params']
  r = jax.random.normal(jax.random.key(7), (2, 4, 3), jnp.float64)

  def loss(p, xs):
    return jnp.sum(jnp.sin(model.apply({'params': p}, xs)) * r)

  value, grads, curvature = jax.jit(afo.value_and_grad_with_curvature(loss))(
    params, xs
  )
  want_value, want_grads = jax.value_and_grad(loss)(params, xs)
  np.testing.assert_allclose(value, want_value, rtol=1e-12)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, **TOL), grads, want_grads
  )
  assert afo.unpreconditioned_parameters(params, curvature) == []
  (name,) = params  # the cell's params, directly under the model's
  cell_params, stats = params[name], curvature[name]
  hiddens, g = _manual_lstm(cell_params, xs, r)
  for gate in 'ifgo':
    for source, inputs, bias in (('i', xs, False), ('h', hiddens, True)):
      want_h, want_s = bf.dense(inputs, g[gate], [2], 1, bias)
      h, s = stats[source + gate].means()
      np.testing.assert_allclose(h, want_h, **TOL)
      np.testing.assert_allclose(s, want_s, **TOL)


@pytest.mark.parametrize(
  'layer, x_hat',
  [
    (
      nn.BatchNorm(use_running_average=False, scale_init=nn.initializers.zeros),
      lambda x: bf.layer_norm_x_hat(x, (0, 1, 2), 1e-5),
    ),
    (
      nn.GroupNorm(num_groups=2, scale_init=nn.initializers.zeros),
      lambda x: bf.group_norm_x_hat(x, 2, 1e-6),
    ),
    (
      nn.LayerNorm(scale_init=nn.initializers.zeros),
      lambda x: bf.layer_norm_x_hat(x, (3,), 1e-6),
    ),
  ],
)
def test_paper_x_hat_of_a_norm_with_a_zero_scale(x64, layer, x_hat):
  """A zero-initialised scale (the last BatchNorm of a ResNet block) hides
  ``x_hat`` from the output; it is read from the input."""
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 4), jnp.float64) * 2 + 1
  variables = layer.init(jax.random.key(1), x)

  def loss(params):
    rest = {k: v for k, v in variables.items() if k != 'params'}
    y = layer.apply({'params': params, **rest}, x, mutable=list(rest))[0]
    return jnp.sum(jnp.sin(y))

  params = variables['params']
  assert not np.any(params['scale'])
  stats = afo.value_and_grad_with_curvature(loss)(params)[2]
  h, _ = stats.means('paper')
  want = (np.asarray(x_hat(np.asarray(x))) ** 2).reshape(-1, 4).mean(0)
  np.testing.assert_allclose(h, want, rtol=1e-9)


def test_paper_x_hat_of_a_bfloat16_layer_norm_is_read_from_its_input():
  """From a bfloat16 output, ``(y - bias) / scale`` loses the digits a small
  scale under a large bias leaves (1.8x off at scale 0.01, bias 4)."""
  layer = nn.LayerNorm(dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (4, 6))
  params = {'scale': jnp.full(6, 0.01), 'bias': jnp.full(6, 4.0)}

  def loss(params):
    return jnp.sum(layer.apply({'params': params}, x).astype(jnp.float32))

  stats = afo.value_and_grad_with_curvature(loss)(params)[2]
  h, _ = stats.means('paper')
  want = (bf.layer_norm_x_hat(np.asarray(x), (1,), 1e-6) ** 2).mean(0)
  np.testing.assert_allclose(h, want, rtol=1e-4)
