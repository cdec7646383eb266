"""Brute-force statistics, written straight from ADAFISHER_SPEC.md section 1.

Everything here materialises what the library avoids (im2col patches, one-hot
rows, normalised inputs recomputed from scratch) and works in NumPy float64.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def dense(x, g, contracted, n_out, bias):
  """``H = mean(a_bar**2)``, ``S = mean(g**2)`` over rows."""
  x = np.moveaxis(np.asarray(x), contracted, range(-len(contracted), 0))
  d_in = math.prod(x.shape[-len(contracted) :])
  a = x.reshape(-1, d_in)
  if bias:
    a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
  g = np.asarray(g)
  g = g.reshape(-1, math.prod(g.shape[g.ndim - n_out :]))
  return (a**2).mean(0), (g**2).mean(0)


def same_pads(size, dilated_kernel, stride):
  out = -(-size // stride)
  total = max((out - 1) * stride + dilated_kernel - size, 0)
  return (total // 2, total - total // 2)


def im2col(x, kernel_size, strides, padding, input_dilation, kernel_dilation):
  """Patches ``[B, L, *kernel, C]`` of a channels-last input ``[B, *sp, C]``.

  ``padding`` is ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``,
  ``'CAUSAL'`` or explicit ``(low, high)`` pairs, with Flax's meaning.
  """
  x = np.asarray(x)
  n = len(kernel_size)
  dk = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
  if padding in ('CIRCULAR', 'REFLECT'):
    mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[padding]
    pad = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dk] + [(0, 0)]
    x, padding = np.pad(x, pad, mode=mode), 'VALID'
  elif padding == 'CAUSAL':
    x, padding = np.pad(x, [(0, 0), (dk[0] - 1, 0), (0, 0)]), 'VALID'
  shape = [(s - 1) * d + 1 for s, d in zip(x.shape[1:-1], input_dilation)]
  dilated = np.zeros((x.shape[0], *shape, x.shape[-1]))
  dilated[
    (slice(None),) + tuple(slice(None, None, d) for d in input_dilation)
  ] = x
  if padding == 'SAME':
    pads = [same_pads(s, k, st) for s, k, st in zip(shape, dk, strides)]
  elif padding == 'VALID':
    pads = [(0, 0)] * n
  else:
    pads = [tuple(p) for p in padding]
  padded = np.pad(dilated, [(0, 0)] + pads + [(0, 0)])
  out = [(p - k) // s + 1 for p, k, s in zip(padded.shape[1:-1], dk, strides)]
  patches = np.zeros((x.shape[0], math.prod(out), *kernel_size, x.shape[-1]))
  for li, pos in enumerate(itertools.product(*map(range, out))):
    for off in itertools.product(*map(range, kernel_size)):
      idx = tuple(
        p * s + o * d for p, s, o, d in zip(pos, strides, off, kernel_dilation)
      )
      patches[(slice(None), li) + off] = padded[(slice(None),) + idx]
  return patches, out


def conv_output(patches, kernel, bias, groups, out_spatial):
  """Convolution through the patches (checks the brute force itself)."""
  b, n_pos = patches.shape[:2]
  c_in = patches.shape[-1]
  per_group = patches.reshape(b, n_pos, -1, groups, c_in // groups)
  per_group = np.moveaxis(per_group, 3, 2).reshape(b, n_pos, groups, -1)
  c_out = kernel.shape[-1]
  w = np.asarray(kernel).reshape(-1, groups, c_out // groups)
  y = np.einsum('blgd,dgo->blgo', per_group, w).reshape(b, n_pos, c_out)
  if bias is not None:
    y = y + np.asarray(bias)
  return y.reshape(b, *out_spatial, c_out)


def conv(patches, g, groups, bias):
  """The authors' conv statistics (divisors of spec section 1)."""
  b, n_pos = patches.shape[:2]
  c_in = patches.shape[-1]
  kernel = patches.shape[2:-1]
  rows = patches.reshape(b, n_pos, *kernel, groups, c_in // groups)
  rows = np.moveaxis(rows, -2, 2).reshape(b * n_pos * groups, -1)
  d = rows.shape[1]
  if bias:
    rows = np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)
  h = (rows**2).sum(0) / (b * n_pos * d)
  g = np.asarray(g).reshape(b * n_pos, -1)
  return h, (g**2).sum(0) / (b * n_pos)


def embed(ids, g, vocab):
  ids = np.asarray(ids).reshape(-1)
  one_hot = np.eye(vocab)[ids]
  g = np.asarray(g).reshape(ids.size, -1)
  return (one_hot**2).mean(0), (g**2).mean(0)


def norm_paper(x_hat, g, feature_axes):
  """``H_c = mean(x_hat_c**2)``, ``S_c = mean(g_c**2)`` over rows."""

  def rows(v):
    v = np.moveaxis(np.asarray(v), feature_axes, range(-len(feature_axes), 0))
    return v.reshape(-1, math.prod(v.shape[-len(feature_axes) :]))

  return (rows(x_hat) ** 2).mean(0), (rows(g) ** 2).mean(0)


def norm_reference(x, g, k, feature_axes):
  """The authors' surrogate: ``H = [sum z_k**2, K] / B**2``, ``S``."""
  x, g = np.asarray(x), np.asarray(g)
  batch, size_k = x.shape[0], x.shape[k]
  m = x.size // (batch * size_k)
  z = x.sum(axis=tuple(i for i in range(x.ndim) if i != k)) / m**2
  h = np.array([(z**2).sum(), size_k]) / batch**2
  per_feature = g.sum(
    axis=tuple(i for i in range(g.ndim) if i not in feature_axes)
  )
  return h, per_feature.reshape(-1) ** 2 / batch


def layer_norm_x_hat(x, axes, eps):
  mean = x.mean(axis=axes, keepdims=True)
  var = x.var(axis=axes, keepdims=True)
  return (x - mean) / np.sqrt(var + eps)


def rms_norm_x_hat(x, axes, eps):
  return x / np.sqrt((x**2).mean(axis=axes, keepdims=True) + eps)


def group_norm_x_hat(x, groups, eps):
  shape = x.shape
  grouped = x.reshape(shape[0], -1, groups, shape[-1] // groups)
  axes = (1, 3)
  mean = grouped.mean(axis=axes, keepdims=True)
  var = grouped.var(axis=axes, keepdims=True)
  return ((grouped - mean) / np.sqrt(var + eps)).reshape(shape)


def tied_embedding(table, mix_apply, ids, r):
  """``(lookup H, S), (attend H, S)`` of a table used for the lookup and the
  output of ``logits = tanh(h + mix(h)) @ table.T`` under ``sum(sin(logits)
  * r)``; the gradients of each use come from perturbing its output (JAX)."""
  import jax
  import jax.numpy as jnp

  def loss(perturbations):
    h = table[ids] + perturbations[0]
    h = h + mix_apply(h)
    queries = jnp.tanh(h)
    logits = queries @ table.T + perturbations[1]
    return jnp.sum(jnp.sin(logits) * r), queries

  zeros = [jnp.zeros(ids.shape + (table.shape[1],)), jnp.zeros(r.shape)]
  (g_lookup, g_logits), queries = jax.grad(loss, has_aux=True)(zeros)
  lookup = embed(ids, g_lookup, table.shape[0])
  attend = dense(queries, g_logits, [queries.ndim - 1], 1, False)
  return lookup, attend
