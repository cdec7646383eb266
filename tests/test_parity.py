"""``numerics="reference"`` reproduces the authors' PyTorch trajectories."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafisher_optax as afo

import parity_models as pm

pytestmark = pytest.mark.usefixtures('x64')
RTOL = 1e-9


def _rel(actual, desired):
  actual, desired = np.asarray(actual), np.asarray(desired)
  return np.max(np.abs(actual - desired)) / np.max(np.abs(desired))


def _torch_layout(kernel_like, torch_shape):
  """A flax-layout kernel array in PyTorch's weight layout."""
  a = np.asarray(kernel_like)
  return a.T if a.ndim == 2 else a.transpose(3, 2, 0, 1).reshape(torch_shape)


@pytest.mark.parametrize('name', ['mlp', 'cnn'])
def test_reference_numerics_match_authors_code(name):
  model, data, meta = pm.load(name)
  hyper = meta['hyper']
  layers = meta['layers']
  params = jax.tree.map(
    jnp.asarray,
    {layer: pm.torch_to_flax(name, layer, data, 0) for layer in layers},
  )
  tx = afo.adafisher(
    hyper['lr'],
    b1=hyper['beta'],
    damping=hyper['Lambda'],
    gamma=hyper['gamma'],
    t_cov=hyper['TCov'],
    weight_decay=hyper['weight_decay'],
  )
  opt_state = tx.init(params)

  def loss_fn(p, x, y):
    logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grad_fn = afo.value_and_grad_with_curvature(loss_fn)

  @jax.jit
  def step(p, s, x, y):
    loss, grads, curvature = grad_fn(p, x, y)
    updates, s = tx.update(grads, s, p, curvature=curvature)
    return optax.apply_updates(p, updates), s, loss, curvature, updates

  for t in range(meta['steps']):
    x, y = pm.inputs(name, data, t), data['y'][t]
    before = params
    params, opt_state, loss, curvature, updates = step(params, opt_state, x, y)
    np.testing.assert_allclose(loss, data['loss'][t], rtol=1e-12)
    inner = afo.adafisher_state(opt_state)
    for layer in layers:
      kernel_shape = params[layer]['kernel'].shape
      h_hat, s_hat = curvature[layer].means()
      h_hat = np.asarray(h_hat)
      if name == 'cnn' and layer.startswith('conv'):
        h_hat = pm.conv_h_to_torch_order(h_hat, kernel_shape)
      assert _rel(h_hat, data[f'{layer}_H_raw'][t]) < RTOL, (layer, t)
      assert _rel(s_hat, data[f'{layer}_S_raw'][t]) < RTOL, (layer, t)
      factors = inner.factors[layer]
      h_d = np.asarray(factors.h)
      if name == 'cnn' and layer.startswith('conv'):
        h_d = pm.conv_h_to_torch_order(h_d, kernel_shape)
      assert _rel(h_d, data[f'{layer}_H_D'][t]) < RTOL, (layer, t)
      assert _rel(factors.s, data[f'{layer}_S_D'][t]) < RTOL, (layer, t)
      torch_w = data[f'{layer}_W'][0].shape
      momentum = inner.mu[layer]
      assert (
        _rel(_torch_layout(momentum['kernel'], torch_w), data[f'{layer}_mW'][t])
        < RTOL
      ), (layer, t)
      # F~ recovered from the update: u = -lr * m_hat / F~.
      m_hat = np.asarray(momentum['kernel']) / (1 - hyper['beta'] ** (t + 1))
      u = np.asarray(updates[layer]['kernel'])
      live = _torch_layout(np.abs(u) > 1e-300, torch_w)
      f_w = -hyper['lr'] * m_hat / np.where(u == 0, 1, u)
      np.testing.assert_allclose(
        _torch_layout(f_w, torch_w)[live],
        data[f'{layer}_FW'][t][live],
        rtol=1e-9,
      )
      for key, want in pm.torch_to_flax(name, layer, data, t + 1).items():
        assert _rel(params[layer][key], want) < RTOL, (layer, key, t)
        assert (
          _rel(before[layer][key], pm.torch_to_flax(name, layer, data, t)[key])
          < RTOL
        )


def test_reference_layers_reproduce_authors_coverage():
  """``layers=REFERENCE_LAYERS`` leaves Embed and RMSNorm at ``F~ = 1``."""
  import flax.linen as nn

  class Model(nn.Module):
    @nn.compact
    def __call__(self, ids):
      x = nn.Embed(10, 8, name='embed')(ids)
      x = nn.RMSNorm(name='rms')(x)
      x = nn.LayerNorm(name='ln')(x)
      return nn.Dense(3, name='head')(x).mean()

  model = Model()
  ids = jnp.array([[1, 2, 3], [4, 5, 6]])
  params = model.init(jax.random.key(0), ids)['params']
  grad_fn = afo.value_and_grad_with_curvature(
    lambda p, ids: model.apply({'params': p}, ids), layers=afo.REFERENCE_LAYERS
  )
  _, _, curvature = grad_fn(params, ids)
  assert sorted(curvature) == ['head', 'ln']
  assert afo.unpreconditioned_parameters(params, curvature) == [
    'embed/embedding',
    'rms/scale',
  ]
  full = afo.value_and_grad_with_curvature(
    lambda p, ids: model.apply({'params': p}, ids)
  )
  assert sorted(full(params, ids)[2]) == ['embed', 'head', 'ln', 'rms']
