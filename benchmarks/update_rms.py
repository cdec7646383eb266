"""The RMS of ``optax.adam``'s update per layer over training.

``grafting='rms'`` rescales each layer's AdaFisher update to a fixed RMS so
that Adam's learning rate carries over; this measures the value to aim at.
Adam (``lr=1e-3``, the defaults) trains each model; every ``--every`` steps
the RMS of the update ``m_hat / (sqrt(v_hat) + eps)`` of every group (the
parameters of one layer together, as grafting groups them) is recorded.
Printed: per model, quantiles over groups and steps after the first 10%.

  python -m benchmarks.update_rms [--steps 400]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import datasets, models

RESULTS = Path(__file__).parent / 'results'


def _problems(batch: int):
  """``(name, model, x_fn, loss)``: digits MLP and CNN, Shakespeare GPT."""
  digits = datasets.digits()
  images = datasets.as_images(digits['x_train'])
  labels = digits['y_train']
  rng = np.random.default_rng(0)

  def image_batch():
    idx = rng.integers(0, len(labels), batch)
    return images[idx], labels[idx]

  text = datasets.char_dataset(datasets.shakespeare(), seq_len=64)

  def text_batch():
    return text.sample(rng, batch)

  def cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return [
    ('mlp', models.MLP((256, 256)), image_batch, cross_entropy),
    ('cnn_batchnorm', models.SmallCNN(), image_batch, cross_entropy),
    (
      'char_gpt',
      models.CharGPT(len(text.vocab), layers=2, d_model=64, max_len=64),
      text_batch,
      cross_entropy,
    ),
  ]


def _group_rms(updates) -> list[float]:
  """RMS per group: the leaves under one parent path together."""
  groups: dict[tuple, list] = {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
    groups.setdefault(tuple(keypath[:-1]), []).append(leaf)
  return [
    float(
      jnp.sqrt(sum(jnp.sum(v**2) for v in leaves) / sum(v.size for v in leaves))
    )
    for leaves in groups.values()
  ]


def measure(model, next_batch, loss, steps: int, every: int) -> list[float]:
  x, _ = next_batch()
  variables = model.init(jax.random.key(0), x, train=False)
  params = variables['params']
  extra = {k: v for k, v in variables.items() if k != 'params'}
  direction = optax.scale_by_adam()
  tx = optax.chain(direction, optax.scale(-1e-3))
  state = tx.init(params)

  @jax.jit
  def step(params, extra, state, x, y):
    def objective(p):
      logits, new = model.apply({'params': p, **extra}, x, mutable=list(extra))
      return loss(logits, y), new

    (_, new_extra), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, state = tx.update(grads, state, params)
    adam_direction = jax.tree.map(lambda u: u / -1e-3, updates)
    return (
      optax.apply_updates(params, updates),
      new_extra,
      state,
      adam_direction,
    )

  samples = []
  for t in range(steps):
    x, y = next_batch()
    params, extra, state, direction_now = step(params, extra, state, x, y)
    if t >= steps // 10 and t % every == 0:
      samples += _group_rms(direction_now)
  return samples


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--every', type=int, default=20)
  parser.add_argument('--batch', type=int, default=64)
  args = parser.parse_args(argv)
  results = {}
  for name, model, next_batch, loss in _problems(args.batch):
    samples = measure(model, next_batch, loss, args.steps, args.every)
    quantiles = np.quantile(samples, [0.1, 0.25, 0.5, 0.75, 0.9])
    results[name] = dict(zip(['q10', 'q25', 'median', 'q75', 'q90'], quantiles))
    print(
      f'{name:14s} Adam update RMS per layer: '
      + ', '.join(f'{k} {v:.3f}' for k, v in results[name].items())
    )
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / 'update_rms.json').write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
  main()
