"""Models used by the benchmarks and the main job."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """784-1024-1024-10 by default."""

  widths: tuple[int, ...] = (1024, 1024)
  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = x.reshape(x.shape[0], -1)
    for width in self.widths:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.classes)(x)


class ResidualBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
    y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    y = norm()(y)
    if x.shape != y.shape:
      x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A small ResNet: a stem and 3 stages of residual blocks with BatchNorm."""

  stage_features: tuple[int, ...] = (32, 64, 128)
  blocks_per_stage: int = 1
  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.stage_features[0], (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage, features in enumerate(self.stage_features):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(features, strides)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.classes)(x)


class SmallCNN(nn.Module):
  """Two conv blocks (Conv-BatchNorm-ReLU-pool) and two Dense layers."""

  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    for features in (32, 64):
      x = nn.Conv(features, (3, 3), use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(self.classes)(x)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with ``nn.DenseGeneral`` projections."""

  heads: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = True):
    d_model = x.shape[-1]
    head_dim = d_model // self.heads
    project = lambda name: nn.DenseGeneral((self.heads, head_dim), name=name)  # noqa: E731
    q, k, v = project('query')(x), project('key')(x), project('value')(x)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(head_dim)
    length = x.shape[-2]
    causal = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    weights = nn.Dropout(self.dropout, deterministic=not train)(
      nn.softmax(scores, axis=-1)
    )
    y = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    return nn.DenseGeneral(d_model, axis=(-2, -1), name='out')(y)


class TransformerBlock(nn.Module):
  """Pre-LayerNorm: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` (4x, gelu)."""

  heads: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = x + CausalSelfAttention(self.heads, self.dropout)(
      nn.LayerNorm()(x), train
    )
    d_model = x.shape[-1]
    y = nn.gelu(nn.Dense(4 * d_model)(nn.LayerNorm()(x)))
    y = nn.Dense(d_model)(y)
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class _ScannedBlock(nn.Module):
  """A :class:`TransformerBlock` in ``nn.scan``'s ``(carry, x)`` form."""

  heads: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    return TransformerBlock(self.heads, self.dropout)(x, train), None


class CharGPT(nn.Module):
  """A character-level GPT: int tokens ``[B, T]`` to logits ``[B, T, vocab]``.

  Token and learned positional embeddings (``nn.Embed``), pre-LayerNorm
  blocks of causal self-attention and a 4x gelu MLP, a final LayerNorm and an
  untied ``nn.Dense`` head, or with ``tied=True`` the token table as the
  output projection (``nn.Embed.attend``, as GPT-2 and nanoGPT). No dropout
  by default, so steps are deterministic. Blocks are unrolled, or with
  ``scan=True`` one ``nn.scan`` over stacked block params.
  """

  vocab: int
  layers: int = 4
  d_model: int = 128
  heads: int = 4
  max_len: int = 128
  dropout: float = 0.0
  tied: bool = False
  scan: bool = False

  @nn.compact
  def __call__(self, tokens, train: bool = True):
    length = tokens.shape[-1]
    if length > self.max_len:
      raise ValueError(f'sequence length {length} > max_len {self.max_len}')
    embed = nn.Embed(self.vocab, self.d_model, name='tokens')
    x = embed(tokens)
    x = x + nn.Embed(self.max_len, self.d_model, name='positions')(
      jnp.arange(length)
    )
    if self.scan:
      blocks = nn.scan(
        _ScannedBlock,
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=nn.broadcast,
        length=self.layers,
      )
      x, _ = blocks(self.heads, self.dropout, name='blocks')(x, train)
    else:
      for _ in range(self.layers):
        x = TransformerBlock(self.heads, self.dropout)(x, train)
    x = nn.LayerNorm()(x)
    if self.tied:
      return embed.attend(x)
    return nn.Dense(self.vocab, name='head')(x)


class Autoencoder(nn.Module):
  """A deep autoencoder: ``784-w1-...-code`` and the mirror image back to 784.

  Logistic (sigmoid) hidden units, a linear code layer, and linear output
  logits (the loss applies the sigmoid), as in the classic curvature
  benchmark (Hinton & Salakhutdinov 2006; Martens 2010; Martens & Grosse
  2015: 784-1000-500-250-30).
  """

  widths: tuple[int, ...] = (1000, 500, 250, 30)
  pixels: int = 784

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    h = x.reshape(x.shape[0], -1)
    *hidden, code = self.widths
    for width in hidden:
      h = nn.sigmoid(nn.Dense(width)(h))
    h = nn.Dense(code, name='code')(h)
    for width in reversed(hidden):
      h = nn.sigmoid(nn.Dense(width)(h))
    return nn.Dense(self.pixels, name='pixels')(h)
