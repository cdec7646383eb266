"""Small models of the families users bring, on small real data.

Each :class:`Problem` is a model, a loss ``loss_fn(params, x, y)`` in the
README's form (``model.apply({'params': params}, x)``), and batches: digits
images (scikit-learn) for the MLP, the CNN with BatchNorm, the VAE and the
U-Net; a character stream for the Transformers. The learning-rate transfer
benchmark (``benchmarks.lr_transfer``) and the README tests
(``tests/test_dropin.py``) train them with the README's two-program loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

BATCH = 32


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


class BatchNormCNN(nn.Module):
  """Conv-BatchNorm-ReLU twice, global mean pool, a head (training mode)."""

  @nn.compact
  def __call__(self, x):
    for features, strides in ((16, 1), (32, 2)):
      x = nn.Conv(features, (3, 3), strides, use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=False)(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


class WithBatchStats:
  """A BatchNorm model used as the README uses a model: ``apply`` with
  ``{'params': ...}`` only (training-mode batch statistics; the running
  averages, which training mode does not read, are kept out of the way)."""

  def __init__(self, module: nn.Module):
    self.module = module
    self.batch_stats = None

  def init(self, key, x):
    variables = self.module.init(key, x)
    self.batch_stats = variables['batch_stats']
    return {'params': variables['params']}

  def apply(self, variables, x):
    out, _ = self.module.apply(
      {**variables, 'batch_stats': self.batch_stats}, x, mutable='batch_stats'
    )
    return out


class VAE(nn.Module):
  """The Flax example's VAE (encoder, reparameterisation, decoder), small."""

  latents: int = 8

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    h = nn.relu(nn.Dense(64, name='encoder')(x))
    mean = nn.Dense(self.latents, name='mean')(h)
    logvar = nn.Dense(self.latents, name='logvar')(h)
    noise = jax.random.normal(jax.random.key(0), mean.shape)
    z = mean + jnp.exp(0.5 * logvar) * noise
    h = nn.relu(nn.Dense(64, name='decoder')(z))
    return nn.Dense(x.shape[-1], name='pixels')(h), mean, logvar


def vae_loss(model):
  def loss_fn(params, x, y):
    del y
    logits, mean, logvar = model.apply({'params': params}, x)
    target = x.reshape(x.shape[0], -1)
    reconstruction = optax.sigmoid_binary_cross_entropy(logits, target)
    kl = 0.5 * jnp.sum(jnp.exp(logvar) + mean**2 - 1 - logvar, axis=-1)
    return (reconstruction.sum(-1) + kl).mean()

  return loss_fn


class UNet(nn.Module):
  """Conv-GroupNorm-SiLU down and up with a skip connection: a denoiser."""

  @nn.compact
  def __call__(self, x):
    act = lambda y: nn.silu(nn.GroupNorm(num_groups=4)(y))  # noqa: E731
    skip = act(nn.Conv(16, (3, 3))(x))
    h = act(nn.Conv(32, (3, 3), strides=2)(skip))
    h = act(nn.Conv(32, (3, 3))(h))
    h = jax.image.resize(h, skip.shape[:3] + (32,), 'nearest')
    h = act(nn.Conv(16, (3, 3))(jnp.concatenate([h, skip], -1)))
    return nn.Conv(x.shape[-1], (1, 1))(h)


def denoising_loss(model):
  def loss_fn(params, x, y):
    del y
    noisy = x + 0.3 * jax.random.normal(jax.random.key(1), x.shape)
    return jnp.mean((model.apply({'params': params}, noisy) - x) ** 2)

  return loss_fn


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(num_heads=2)(h, h, mask=_causal(h))
    x = x + h
    h = nn.Dense(4 * x.shape[-1])(nn.LayerNorm()(x))
    return x + nn.Dense(x.shape[-1])(nn.gelu(h)), None


def _causal(h):
  return nn.make_causal_mask(jnp.ones(h.shape[:2]))


class ScanTransformer(nn.Module):
  """Token embedding, two pre-LN blocks stacked by ``nn.scan``, a head."""

  vocab: int

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, 32)(tokens)
    x, _ = nn.scan(
      Block, variable_axes={'params': 0}, split_rngs={'params': True}, length=2
    )(name='blocks')(x, None)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


class TiedGPT(nn.Module):
  """GPT-2 style: token and position embeddings, blocks, tied output."""

  vocab: int

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, 32, name='wte')
    x = embed(tokens) + nn.Embed(64, 32, name='wpe')(
      jnp.arange(tokens.shape[-1])
    )
    for i in range(2):
      x, _ = Block(name=f'h{i}')(x, None)
    return embed.attend(nn.LayerNorm()(x))


class NNXNet(nnx.Module):
  """An NNX MLP with LayerNorm."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 64, rngs=rngs)
    self.norm = nnx.LayerNorm(64, rngs=rngs)
    self.head = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    return self.head(nnx.relu(self.norm(self.hidden(x))))


def cross_entropy_loss(model):
  def loss_fn(params, x, y):
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn


@dataclasses.dataclass(frozen=True)
class Problem:
  """A model with its loss and data (``batches(seed)`` never ends)."""

  name: str
  make_model: Callable[[], Any]
  make_loss: Callable[[Any], Callable[..., jax.Array]]
  batches: Callable[[int], Iterator[tuple[np.ndarray, np.ndarray]]]
  nnx: bool = False


def _digits_batches(seed: int):
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  while True:
    idx = rng.integers(0, len(y), BATCH)
    yield x[idx], y[idx]


#: A small English text (the characters of a few repeated sentences) for the
#: token models: enough structure for a loss to fall in a few hundred steps.
TEXT = (
  'to be, or not to be, that is the question: whether tis nobler in the '
  'mind to suffer the slings and arrows of outrageous fortune, or to take '
  'arms against a sea of troubles and by opposing end them. '
)
VOCAB = sorted(set(TEXT))


def _text_batches(seed: int, length: int = 32):
  tokens = np.array([VOCAB.index(c) for c in TEXT * 4], np.int32)
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(tokens) - length - 1, BATCH)
    window = tokens[starts[:, None] + np.arange(length + 1)]
    yield window[:, :-1], window[:, 1:]


PROBLEMS = {
  p.name: p
  for p in [
    Problem('mlp', MLP, cross_entropy_loss, _digits_batches),
    Problem(
      'cnn_batchnorm',
      lambda: WithBatchStats(BatchNormCNN()),
      cross_entropy_loss,
      _digits_batches,
    ),
    Problem('vae', VAE, vae_loss, _digits_batches),
    Problem('unet_groupnorm', UNet, denoising_loss, _digits_batches),
    Problem(
      'scan_transformer',
      lambda: ScanTransformer(len(VOCAB)),
      cross_entropy_loss,
      _text_batches,
    ),
    Problem(
      'tied_gpt', lambda: TiedGPT(len(VOCAB)), cross_entropy_loss, _text_batches
    ),
    Problem(
      'nnx_mlp',
      lambda: NNXNet(nnx.Rngs(0)),
      lambda model: None,
      _digits_batches,
      nnx=True,
    ),
  ]
}
