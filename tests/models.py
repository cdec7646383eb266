"""Small Flax models and a train-step factory shared by the tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import adafisher_optax as afo


class MLP(nn.Module):
  widths: tuple = (16, 8)
  classes: int = 3

  @nn.compact
  def __call__(self, x):
    for i, w in enumerate(self.widths):
      x = jnp.tanh(nn.Dense(w, name=f'dense{i}')(x))
    return nn.Dense(self.classes, name='head')(x)


class ConvNet(nn.Module):
  """Conv + GroupNorm + LayerNorm + Dense: several statistic families."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), name='conv')(x)
    x = nn.relu(nn.GroupNorm(num_groups=2, name='gn')(x))
    x = x.mean(axis=(1, 2))
    x = nn.LayerNorm(name='ln')(x)
    return nn.Dense(3, name='head')(x)


def batch(key, shape, classes=3):
  kx, ky = jax.random.split(key)
  return (
    jax.random.normal(kx, shape),
    jax.random.randint(ky, shape[:1], 0, classes),
  )


def loss_fn(model):
  def loss(params, x, y):
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss


def make_step(model, tx, layers=None):
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model), layers=layers)

  def step(params, opt_state, x, y):
    loss, grads, curvature = grad_fn(params, x, y)
    updates, opt_state = tx.update(
      grads, opt_state, params, curvature=curvature
    )
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def run(model, tx, params, batches):
  step = jax.jit(make_step(model, tx))
  opt_state = tx.init(params)
  for x, y in batches:
    params, opt_state, _ = step(params, opt_state, x, y)
  return params, opt_state


class TiedGPT(nn.Module):
  """A GPT-style model: one ``nn.Embed`` for the lookup and the output."""

  vocab: int = 11
  features: int = 4

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(self.vocab, self.features, name='embed')
    h = embed(ids)
    h = h + nn.Dense(self.features, name='mix')(nn.LayerNorm(name='ln')(h))
    return embed.attend(jnp.tanh(h))
