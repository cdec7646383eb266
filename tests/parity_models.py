"""Flax twins of the tiny PyTorch models behind ``shared/reference``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

REFERENCE_DIR = Path(
  os.environ.get(
    'ADAFISHER_REFERENCE_DIR', Path(__file__).resolve().parent / 'reference'
  )
)


class ParityMLP(nn.Module):
  """Linear(20,32)-ReLU-Linear(32,16)-ReLU-Linear(16,5)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name='fc0')(x))
    x = nn.relu(nn.Dense(16, name='fc1')(x))
    return nn.Dense(5, name='fc2')(x)


class ParityCNN(nn.Module):
  """Conv(3,4,k3,p1)-ReLU-Conv(4,6,k3,s2,no bias)-Flatten(CHW)-Linear(54,3)."""

  @nn.compact
  def __call__(self, x):  # x: NHWC
    x = nn.relu(nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), name='conv0')(x))
    x = nn.Conv(
      6, (3, 3), strides=(2, 2), padding='VALID', use_bias=False, name='conv1'
    )(x)
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    return nn.Dense(3, name='fc')(x)


def load(name: str):
  """Returns ``(model, data, meta)`` for ``parity_<name>.npz``."""
  data = dict(np.load(REFERENCE_DIR / f'parity_{name}.npz'))
  meta = json.loads(str(data.pop('meta_json')))
  model = {'mlp': ParityMLP(), 'cnn': ParityCNN()}[name]
  return model, data, meta


def torch_to_flax(name: str, layer: str, data: dict, t: int) -> dict:
  """The flax params of one layer from the PyTorch weights at index ``t``."""
  w = data[f'{layer}_W'][t]
  out = {'kernel': w.T if w.ndim == 2 else w.transpose(2, 3, 1, 0)}
  if f'{layer}_b' in data:
    out['bias'] = data[f'{layer}_b'][t]
  return out


def inputs(name: str, data: dict, step: int) -> np.ndarray:
  x = data['x'][step]
  return x.transpose(0, 2, 3, 1) if name == 'cnn' else x


def conv_h_to_torch_order(h: np.ndarray, kernel_shape) -> np.ndarray:
  """Reorders a flax conv ``H`` ``(kh, kw, c_in)[+bias]`` to ``(c_in, kh, kw)``."""
  kh, kw, c_in = kernel_shape[:3]
  n = kh * kw * c_in
  body = h[:n].reshape(kh, kw, c_in).transpose(2, 0, 1).reshape(-1)
  return np.concatenate([body, h[n:]])
