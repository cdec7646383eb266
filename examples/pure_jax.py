"""AdaFisher on a model written in plain JAX (no Flax), with tagged layers.

A small CNN on scikit-learn's 8x8 digits: each layer is an
``adafisher_optax.tags`` op on a dict of Flax-named parameters, and
``value_and_grad_with_curvature`` captures their statistics.

    python examples/pure_jax.py --steps 300
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import adafisher_optax as afo
from adafisher_optax import tags


def init(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    'conv': {
      'kernel': 0.3 * jax.random.normal(k1, (3, 3, 1, 16)),
      'bias': jnp.zeros(16),
    },
    'hidden': {
      'kernel': jax.random.normal(k2, (16 * 16, 64)) / 16,
      'bias': jnp.zeros(64),
    },
    'head': {
      'kernel': jax.random.normal(k3, (64, 10)) / 8,
      'bias': jnp.zeros(10),
    },
  }


def model(params, images):
  h = jax.nn.relu(tags.conv(images, params['conv'], strides=2))  # 4x4x16
  h = jax.nn.relu(tags.dense(h.reshape(h.shape[0], -1), params['hidden']))
  return tags.dense(h, params['head'])


def loss_fn(params, images, labels):
  logits = model(params, images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch-size', type=int, default=64)
  args = parser.parse_args(argv)
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]

  params = init(jax.random.key(0))
  tx = afo.adafisher(1e-3)
  opt_state = tx.init(params)
  grad_fn = afo.value_and_grad_with_curvature(loss_fn)

  @functools.partial(jax.jit, static_argnames='refresh')
  def step(params, opt_state, images, labels, refresh):
    loss, grads, curvature = grad_fn(params, images, labels, capture=refresh)
    updates, opt_state = tx.update(
      grads, opt_state, params, curvature=curvature
    )
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)
  schedule = afo.refresh_schedule(opt_state)  # statistics every t_cov steps
  for i in range(args.steps):
    idx = rng.choice(len(x_train), args.batch_size, replace=False)
    params, opt_state, loss = step(
      params, opt_state, x_train[idx], y_train[idx], next(schedule)
    )
    if i % 100 == 0:
      print(f'step {i}: loss {float(loss):.4f}')
  accuracy = float((model(params, x_test).argmax(-1) == y_test).mean())
  print(f'test accuracy after {args.steps} steps: {accuracy:.3f}')
  return accuracy


if __name__ == '__main__':
  main()
