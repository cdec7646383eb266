"""Einsum layers, DenseGeneral with batch_dims and transposed-kernel
ConvTranspose (issue 18): statistics equal brute force in float64, their
curvature is laid out like their kernels, and the optimizer preconditions
them. The NNX twins are in ``test_nnx.LAYERS``."""

import math
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
from test_statistics import TOL, _x, capture_layer

import adafisher_optax as afo

import brute_force as bf

pytestmark = pytest.mark.usefixtures('x64')


def _only(curvature):
  (stats,) = jax.tree.leaves(
    curvature, is_leaf=lambda n: isinstance(n, afo.LayerStatistics)
  )
  return stats


def _curvature(stats, shape, role='weight'):
  """The undamped ``K`` (reference numerics) of one parameter."""
  h, s = stats.means('reference')
  rule = afo.rules.RULES[stats.rule]
  return np.asarray(rule.curvature(h, s, 'reference', role, shape))


def _statistics_and_grads(layer, x):
  """``(statistics, params, grads)`` of ``layer`` under ``sum(sin(y) * r)``."""
  _, _, _, g, variables = capture_layer(layer, x)
  params = variables['params']

  def loss(p, x):
    return jnp.sum(layer.apply({'params': p}, x) * g)

  _, grads, curvature = afo.value_and_grad_with_curvature(loss)(params, x)
  return _only(curvature), params, grads, g


# --- einsum ------------------------------------------------------------------

# name: (equation, kernel shape, input shape, use_bias)
EINSUMS = {
  'gemma_query': ('BTD,NDH->BTNH', (3, 5, 4), (2, 6, 5), True),
  'gemma_output': ('BTNH,NHD->BTD', (3, 4, 5), (2, 6, 3, 4), False),
  'stacked_heads': ('BNTH,NHD->BNTD', (3, 4, 5), (2, 3, 6, 4), True),
  'two_stack_axes': ('BEND,ENDF->BENF', (2, 3, 4, 5), (2, 2, 3, 4), True),
  'transposed_dense': ('BD,OD->BO', (4, 5), (6, 5), True),
  'summed_input_axis': ('BSD,DO->BO', (5, 4), (2, 3, 5), False),
  'elementwise_scale': ('BTD,D->BTD', (5,), (2, 3, 5), True),
}


def _einsum(kernel_shape, equation, use_bias=True):
  return nn.Einsum(
    kernel_shape,
    equation,
    use_bias=use_bias,
    kernel_init=nn.initializers.normal(0.5),
  )


def _einsum_brute_force(equation, x, g, use_bias):
  """Per stack slice (kernel axes also in input and output), a Dense layer
  on each row's contracted entries (kernel order), written from the
  equation: ``H[*stack, d_in (+1)]``, ``S[*stack, d_out]`` (output order)."""
  operands, outputs = equation.split('->')
  inputs, kernel = operands.split(',')
  x = np.asarray(x).sum(
    axis=tuple(i for i, a in enumerate(inputs) if a not in kernel + outputs)
  )
  inputs = ''.join(a for a in inputs if a in kernel + outputs)
  stack = ''.join(a for a in kernel if a in inputs and a in outputs)
  contracted = ''.join(a for a in kernel if a in inputs and a not in outputs)
  features = ''.join(a for a in outputs if a in kernel and a not in inputs)
  rows = ''.join(a for a in outputs if a not in kernel)
  x = np.einsum(f'{inputs}->{stack}{rows}{contracted}', x)
  g = np.einsum(f'{outputs}->{stack}{rows}{features}', np.asarray(g))
  stack_shape = x.shape[: len(stack)]
  n_rows = math.prod(x.shape[len(stack) : len(stack) + len(rows)])
  x = x.reshape(-1, n_rows, math.prod(x.shape[len(stack) + len(rows) :]))
  g = g.reshape(x.shape[0], n_rows, -1)
  hs, ss = zip(*(bf.dense(a, b, [1], 1, use_bias) for a, b in zip(x, g)))
  return (
    np.stack(hs).reshape(*stack_shape, -1),
    np.stack(ss).reshape(*stack_shape, -1),
  )


@pytest.mark.parametrize('name', sorted(EINSUMS))
def test_einsum_statistics_equal_brute_force(name):
  equation, kernel_shape, shape, use_bias = EINSUMS[name]
  layer = _einsum(kernel_shape, equation, use_bias)
  x = _x(*shape)
  h, s, _, g, _ = capture_layer(layer, x)
  want_h, want_s = _einsum_brute_force(equation, x, g, use_bias)
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(s, want_s, **TOL)


@pytest.mark.parametrize('name', sorted(EINSUMS))
def test_einsum_curvature_is_laid_out_like_the_kernel(name):
  """With one row per stack slice, ``H (x) S`` is the squared gradient of
  each kernel (and bias) entry: a wrong axis order cannot pass."""
  equation, kernel_shape, shape, use_bias = EINSUMS[name]
  inputs = equation.split(',')[0]
  kernel = equation.split(',')[1].split('->')[0]
  one_row = tuple(
    d if a in kernel else 1 for a, d in zip(inputs, shape, strict=True)
  )
  layer = _einsum(kernel_shape, equation, use_bias)
  stats, params, grads, _ = _statistics_and_grads(layer, _x(*one_row))
  assert stats.rule.startswith('einsum:')
  for name_, role in (('kernel', 'weight'), ('bias', 'bias')):
    if name_ in params:
      np.testing.assert_allclose(
        _curvature(stats, params[name_].shape, role),
        np.asarray(grads[name_]) ** 2,
        **TOL,
      )


def test_einsum_with_an_ellipsis_equals_the_explicit_equation():
  x = _x(2, 6, 5)
  got = capture_layer(nn.Einsum((3, 5, 4), '...D,NDH->...NH'), x)
  want = capture_layer(nn.Einsum((3, 5, 4), 'BTD,NDH->BTNH'), x)
  for a, b in zip(got[:2], want[:2]):
    np.testing.assert_allclose(a, b, **TOL)


def test_einsum_equation_given_at_call_time():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Einsum((3, 5, 4), name='proj')(x, 'BTD,NDH->BTNH')

  model = Model()
  x = _x(2, 6, 5)
  params = model.init(jax.random.key(0), x)['params']
  _, _, curvature = afo.value_and_grad_with_curvature(
    lambda p, x: jnp.sum(model.apply({'params': p}, x) ** 2)
  )(params, x)
  assert curvature['proj'].rule == 'einsum:NDH|D>NH'


@pytest.mark.parametrize(
  'equation,kernel_shape,shape,why',
  [
    ('BTD,NDH->BTN', (3, 5, 4), (2, 6, 5), "kernel axis 'H' is in neither"),
    ('BDD,DH->BH', (5, 4), (2, 5, 5), "index 'D' repeated in the inputs"),
    ('BND,DNH->BNH', (5, 3, 4), (2, 3, 5), 'do not lead the kernel'),
    ('BND,DN->BND', (5, 3), (2, 3, 5), 'bias runs over'),
  ],
)
def test_einsum_the_rule_cannot_follow_is_reported(
  equation, kernel_shape, shape, why
):
  layer = nn.Einsum(kernel_shape, equation)
  x = _x(*shape)
  params = layer.init(jax.random.key(0), x)['params']
  grad_fn = afo.value_and_grad_with_curvature(
    lambda p, x: jnp.sum(layer.apply({'params': p}, x) ** 2)
  )
  with pytest.warns(afo.UnsupportedLayerWarning, match=why):
    _, _, curvature = grad_fn(params, x)
  assert curvature == {}
  assert afo.unpreconditioned_parameters(params, curvature) == [
    'bias',
    'kernel',
  ]


def test_einsum_rules_are_rebuilt_from_their_names():
  """A state names its rules; a process that never captured resolves them."""
  code = (
    'import adafisher_optax as afo, jax.numpy as jnp\n'
    "rule = afo.rules.RULES['einsum:NDH|D>NH']\n"
    "k = rule.curvature(jnp.arange(1., 6.), jnp.arange(1., 13.), 'paper',"
    " 'weight', (3, 5, 4))\n"
    'assert k.shape == (3, 5, 4) and float(k[2, 4, 1]) == 5 * 10\n'
    "assert afo.rules.RULES['einsum:NHD|H>D'].name == 'einsum:NHD|H>D'\n"
  )
  subprocess.run([sys.executable, '-c', code], check=True)
  config = afo.rules.einsum_config('BTD,NDH->BTNH', (2, 6, 5), (3, 5, 4), True)
  assert afo.rules.EINSUM.resolve(config) == afo.rules.RULES['einsum:NDH|D>NH']
  with pytest.raises(KeyError):
    afo.rules.RULES['einsum:NDH|X>NH']


# --- DenseGeneral with batch_dims: a stack of independent layers ------------

DENSE_GENERALS = {
  'one_batch_dim': (dict(features=(2, 3), batch_dims=(0,)), (4, 3, 5)),
  'two_batch_dims_no_bias': (
    dict(features=3, batch_dims=(0, 1), use_bias=False),
    (2, 3, 4, 5),
  ),
  'several_contracted': (
    dict(features=3, axis=(2, 3), batch_dims=(0,)),
    (3, 4, 5, 2),
  ),
}


@pytest.mark.parametrize('name', sorted(DENSE_GENERALS))
def test_dense_general_batch_dims_give_per_slice_statistics(name):
  config, shape = DENSE_GENERALS[name]
  layer = nn.DenseGeneral(**config)
  x = _x(*shape)
  h, s, _, g, _ = capture_layer(layer, x)
  n_batch = len(config['batch_dims'])
  axis = np.atleast_1d(config.get('axis', -1)) % x.ndim
  stack = x.shape[:n_batch]
  x_slices = np.asarray(x).reshape(-1, *x.shape[n_batch:])
  g_slices = np.asarray(g).reshape(-1, *g.shape[n_batch:])
  n_out = len(np.atleast_1d(config['features']))
  use_bias = config.get('use_bias', True)
  for i, (xi, gi) in enumerate(zip(x_slices, g_slices)):
    want_h, want_s = bf.dense(xi, gi, list(axis - n_batch), n_out, use_bias)
    index = np.unravel_index(i, stack)
    np.testing.assert_allclose(h[index], want_h, **TOL)
    np.testing.assert_allclose(s[index], want_s, **TOL)


def test_dense_general_batch_dims_curvature_is_per_slice():
  layer = nn.DenseGeneral((2, 3), batch_dims=(0,))
  stats, params, grads, _ = _statistics_and_grads(layer, _x(4, 1, 5))
  assert stats.rows.shape == (4,)
  for name, role in (('kernel', 'weight'), ('bias', 'bias')):
    np.testing.assert_allclose(
      _curvature(stats, params[name].shape, role),
      np.asarray(grads[name]) ** 2,
      **TOL,
    )


# --- ConvTranspose(transpose_kernel=True) -----------------------------------


@pytest.mark.parametrize(
  'config,shape',
  [
    (dict(kernel_size=(3, 2), strides=(2, 1)), (2, 4, 3, 3)),
    (dict(kernel_size=(3,), strides=(2,), padding='VALID'), (2, 5, 3)),
  ],
)
def test_transposed_kernel_conv_transpose(config, shape):
  """The layer is a convolution whose kernel is the parameter flipped and
  transposed: its statistics (brute force through im2col), and that
  convolution's curvature flipped and transposed back."""
  layer = nn.ConvTranspose(4, transpose_kernel=True, **config)
  x = _x(*shape)
  stats, params, _, g = _statistics_and_grads(layer, x)
  assert stats.rule == 'conv_transpose_kernel'
  conv = afo.flax_adapters.conv_transpose_config(layer, x, {})
  patches, out = bf.im2col(
    x,
    conv.kernel_size,
    conv.strides,
    conv.padding,
    conv.input_dilation,
    conv.kernel_dilation,
  )
  n = len(conv.kernel_size)
  kernel = np.asarray(params['kernel'])
  twin_kernel = np.swapaxes(np.flip(kernel, tuple(range(n))), -1, -2)
  y = layer.apply({'params': params}, x)
  np.testing.assert_allclose(
    bf.conv_output(patches, twin_kernel, params['bias'], 1, out), y, **TOL
  )
  h, s = stats.means('reference')
  want_h, want_s = bf.conv(patches, g, 1, True)
  np.testing.assert_allclose(h, want_h, **TOL)
  np.testing.assert_allclose(s, want_s, **TOL)
  twin_k = afo.rules.CONV.curvature(
    h, s, 'reference', 'weight', twin_kernel.shape
  )
  np.testing.assert_allclose(
    _curvature(stats, kernel.shape),
    np.swapaxes(np.flip(twin_k, tuple(range(n))), -1, -2),
    **TOL,
  )


# --- the optimizer preconditions them ----------------------------------------


class GemmaLike(nn.Module):
  """Gemma-style attention (einsum projections), a per-position
  DenseGeneral with batch_dims and a transposed-kernel ConvTranspose."""

  @nn.compact
  def __call__(self, x):
    q = nn.Einsum((2, 6, 3), 'BTD,NDH->BTNH', name='query')(x)
    k = nn.Einsum((2, 6, 3), 'BTD,NDH->BTNH', use_bias=False, name='key')(x)
    weights = jax.nn.softmax(jnp.einsum('BTNH,BSNH->BNTS', q, k), axis=-1)
    v = jnp.einsum('BNTS,BSD->BNTD', weights, x)
    heads = nn.Einsum((2, 6, 4), 'BNTD,NDF->BNTF', name='heads')(v)
    h = nn.Einsum((2, 4, 6), 'BNTF,NFD->BTD', name='out')(jnp.tanh(heads))
    h = nn.DenseGeneral(6, batch_dims=(0,), name='per_position')(
      jnp.swapaxes(jnp.tanh(h), 0, 1)
    )
    up = nn.ConvTranspose(
      2, (3,), strides=(2,), transpose_kernel=True, name='up'
    )(jnp.swapaxes(h, 0, 1))
    return up.mean(axis=(1, 2))


def test_layers_are_preconditioned_and_training_lowers_the_loss():
  model = GemmaLike()
  x = _x(8, 5, 6)
  target = jnp.sin(x.sum(axis=(1, 2)))
  params = model.init(jax.random.key(0), x)['params']

  def loss(p, x):
    return jnp.mean((model.apply({'params': p}, x) - target) ** 2)

  grad_fn = afo.value_and_grad_with_curvature(loss)
  layout = afo.curvature_layout(grad_fn, params, x)
  tx = afo.adafisher(0.02, layout=layout)
  state = tx.init(params)
  factors = afo.adafisher_state(state).factors
  for path in ('query', 'key', 'heads', 'out', 'per_position', 'up'):
    want = afo.rules.RULES[layout[path].rule].factor_shapes(
      [a.shape for a in layout[path].input_sums],
      [a.shape for a in layout[path].output_sums],
      'reference',
    )
    assert (factors[path].h.shape, factors[path].s.shape) == want
  assert factors['heads'].h.shape == (2, 7)  # stacked over the heads
  assert factors['per_position'].h.shape == (5, 7)

  @jax.jit
  def step(params, state, x):
    value, grads, curvature = grad_fn(params, x)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state, value, curvature

  losses = []
  for _ in range(25):
    params, state, value, curvature = step(params, state, x)
    losses.append(float(value))
  assert losses[-1] < 0.5 * losses[0]
  assert afo.unpreconditioned_parameters(params, curvature) == []
  assert afo.diagnostics(state, params).unpreconditioned == []


class NNXGemmaLike(nnx.Module):
  """The NNX twin of :class:`GemmaLike`."""

  def __init__(self, rngs):
    self.query = nnx.Einsum('BTD,NDH->BTNH', (2, 6, 3), (2, 3), rngs=rngs)
    self.key = nnx.Einsum('BTD,NDH->BTNH', (2, 6, 3), rngs=rngs)
    self.heads = nnx.Einsum('BNTD,NDF->BNTF', (2, 6, 4), (2, 4), rngs=rngs)
    self.out = nnx.Einsum('BNTF,NFD->BTD', (2, 4, 6), (6,), rngs=rngs)
    self.per_position = nnx.LinearGeneral(6, 6, batch_axis={0: 5}, rngs=rngs)
    self.up = nnx.ConvTranspose(
      6, 2, 3, strides=2, transpose_kernel=True, rngs=rngs
    )

  def __call__(self, x):
    q, k = self.query(x), self.key(x)
    weights = jax.nn.softmax(jnp.einsum('BTNH,BSNH->BNTS', q, k), axis=-1)
    v = jnp.einsum('BNTS,BSD->BNTD', weights, x)
    h = self.out(jnp.tanh(self.heads(v)))
    h = self.per_position(jnp.swapaxes(jnp.tanh(h), 0, 1))
    return self.up(jnp.swapaxes(h, 0, 1)).mean(axis=(1, 2))


def test_nnx_layers_are_preconditioned_and_training_lowers_the_loss():
  model = NNXGemmaLike(nnx.Rngs(0))
  x = _x(8, 5, 6)
  target = jnp.sin(x.sum(axis=(1, 2)))

  def loss(model, x):
    return jnp.mean((model(x) - target) ** 2)

  grad_fn = afo.nnx.value_and_grad_with_curvature(loss)
  layout = afo.nnx.curvature_layout(grad_fn, model, x)
  assert layout['heads'].input_sums[0].shape == (2, 7)
  assert layout['per_position'].rows.shape == (5,)
  tx = afo.adafisher(0.02, layout=layout)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x):
    value, grads, curvature = grad_fn(model, x)
    optimizer.update(model, grads, curvature=curvature)
    return value, grads, curvature

  losses = []
  for _ in range(25):
    value, grads, curvature = step(model, optimizer, x)
    losses.append(float(value))
  assert losses[-1] < 0.5 * losses[0]
  assert afo.unpreconditioned_parameters(grads, curvature) == []
  params = nnx.state(model, nnx.Param)
  assert afo.diagnostics(optimizer.opt_state, params).unpreconditioned == []


class _Member(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name='head')(jnp.tanh(nn.Dense(4, name='hidden')(x)))


@pytest.mark.parametrize('container', [list, tuple])
def test_params_holding_a_list_or_tuple_are_captured_like_a_dict(container):
  """An ensemble kept as a list (or tuple) of param dicts: every layer is
  captured, and the run equals the same params keyed '0', '1' in a dict."""
  member = _Member()
  x = jax.random.normal(jax.random.key(0), (6, 5))
  y = jnp.arange(6) % 3
  members = [member.init(jax.random.key(i), x)['params'] for i in range(2)]

  def run(params, keys):
    def loss_fn(params, x, y):
      parts = params['members']
      logits = sum(member.apply({'params': parts[k]}, x) for k in keys)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = afo.adafisher(1e-3, t_cov=1)
    state = tx.init(params)
    grad_fn = afo.value_and_grad_with_curvature(loss_fn)
    for _ in range(3):
      _, grads, curvature = grad_fn(params, x, y)
      assert afo.unpreconditioned_parameters(params, curvature) == []
      updates, state = tx.update(grads, state, params, curvature=curvature)
      params = optax.apply_updates(params, updates)
    return jax.tree.leaves(params)

  in_sequence = run({'members': container(members)}, (0, 1))
  in_dict = run({'members': dict(zip(('0', '1'), members))}, ('0', '1'))
  for a, b in zip(in_sequence, in_dict):
    np.testing.assert_array_equal(a, b)


class _DenseWithProjection(nn.Dense):
  """A Dense subclass with a second registered entry point (no bias)."""

  def project(self, x):
    return x @ self.get_variable('params', 'kernel')


class _LinearWithProjection(nnx.Linear):
  def project(self, x):
    return x @ self.kernel[...]


for _cls in (_DenseWithProjection, _LinearWithProjection):
  afo.register_layer(
    _cls,
    afo.rules.DENSE,
    lambda layer, x, kwargs: afo.rules.Dense(use_bias=False),
    methods=('project',),
  )


@pytest.mark.parametrize('method', ['__call__', 'project'])
@pytest.mark.parametrize('flavour', ['linen', 'nnx'])
def test_a_subclass_registered_for_an_extra_method_keeps_its_base_methods(
  flavour, method
):
  """Registering ``project`` on a Dense subclass adds it: ``__call__`` is
  still captured as the base Dense (statistics of a plain Dense)."""
  x = _x(6, 5)
  if flavour == 'linen':
    layer = _DenseWithProjection(4)
    params = layer.init(jax.random.key(0), x)['params']
    plain = afo.value_and_grad_with_curvature(
      lambda p, x: (nn.Dense(4).apply({'params': p}, x) ** 2).sum()
    )(params, x)[2]
    got = afo.value_and_grad_with_curvature(
      lambda p, x: (layer.apply({'params': p}, x, method=method) ** 2).sum()
    )(params, x)[2]
  else:
    layer = _LinearWithProjection(5, 4, rngs=nnx.Rngs(0))
    plain_layer = nnx.Linear(5, 4, rngs=nnx.Rngs(0))
    plain = afo.nnx.value_and_grad_with_curvature(
      lambda m, x: (m(x) ** 2).sum()
    )(plain_layer, x)[2]
    got = afo.nnx.value_and_grad_with_curvature(
      lambda m, x: (getattr(m, method)(x) ** 2).sum()
    )(layer, x)[2]
  got_h, got_s = got.means()
  want_h, want_s = plain.means()
  if method == 'project':  # no bias column in H; S of x @ kernel
    want_h = want_h[:-1]
    assert not got.bias_name
  np.testing.assert_allclose(got_h, want_h, **TOL)
  if method == '__call__':
    np.testing.assert_allclose(got_s, want_s, **TOL)


class _ByKeyword(nn.Module):
  """Layers given their input by name; ``keyword=False``: by position."""

  keyword: bool = True

  @nn.compact
  def __call__(self, x):
    def call(layer, value, name='inputs'):
      return layer(**{name: value}) if self.keyword else layer(value)

    x = nn.relu(call(nn.Conv(3, (3, 3), name='conv'), x))
    x = call(nn.LayerNorm(name='ln'), x.reshape(x.shape[0], -1), 'x')
    return call(nn.Dense(2, name='head'), x)


def test_an_input_given_by_name_is_captured_as_by_position():
  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 2))
  params = _ByKeyword().init(jax.random.key(1), x)['params']

  def curvature(keyword):
    def loss(p):
      return jnp.mean(_ByKeyword(keyword).apply({'params': p}, x) ** 2)

    with warnings.catch_warnings():
      warnings.simplefilter('error', afo.UnsupportedLayerWarning)
      return afo.value_and_grad_with_curvature(loss)(params)[2]

  by_name, by_position = curvature(True), curvature(False)
  assert set(by_name) == {'conv', 'ln', 'head'}
  jax.tree.map(np.testing.assert_array_equal, by_name, by_position)


def test_a_norm_shared_over_inputs_of_two_lengths_is_reported_as_such():
  """Its reference statistics keep the token axis, so two lengths cannot be
  added; the report says so (not 'two methods')."""

  class Siamese(nn.Module):
    @nn.compact
    def __call__(self, a, b):
      norm = nn.LayerNorm(name='ln')
      return jnp.mean(norm(a)) + jnp.mean(norm(b))

  a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 5, 4))
  params = Siamese().init(jax.random.key(0), a, b)['params']
  grad_fn = afo.value_and_grad_with_curvature(
    lambda p: Siamese().apply({'params': p}, a, b)
  )
  with pytest.warns(afo.UnsupportedLayerWarning, match='different shapes'):
    assert grad_fn(params)[2] == {}
