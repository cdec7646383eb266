"""Every Python snippet of the README and of docs/*.md runs as written.

The snippets of one page run in order in one namespace (a page reads as one
session). The README's first example is run on a small Transformer
(attention and an ``nn.scan`` stack), which the test supplies as
``MyFlaxModel`` with a batch ``x, y`` and a few ``batches``.
"""

from __future__ import annotations

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ['README.md'] + sorted(
  str(p.relative_to(ROOT))
  for p in (ROOT / 'docs').glob('*.md')
  if p.name != 'ADAFISHER_SPEC.md'
)


def snippets(page: str) -> list[str]:
  text = (ROOT / page).read_text()
  return re.findall(r'^```python\n(.*?)^```', text, flags=re.S | re.M)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(num_heads=2, use_bias=False)(h, h)
    x = x + h
    h = nn.Dense(32)(nn.LayerNorm()(x))
    return x + nn.Dense(x.shape[-1], use_bias=False)(nn.gelu(h)), None


class Transformer(nn.Module):
  """Token embedding, two pre-LN blocks stacked by nn.scan, a head."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 16)(tokens)
    x, _ = nn.scan(
      Block,
      variable_axes={'params': 0},
      split_rngs={'params': True},
      length=2,
    )(name='blocks')(x, None)
    return nn.Dense(11)(nn.LayerNorm()(x))


def _transformer_namespace() -> dict:
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 11, (8, 9))
  x, y = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
  return {'MyFlaxModel': Transformer, 'x': x, 'y': y, 'batches': [(x, y)] * 12}


@pytest.mark.parametrize('page', PAGES)
def test_page_snippets_run(page):
  namespace = _transformer_namespace() if page == 'README.md' else {}
  for snippet in snippets(page):
    exec(snippet, namespace)
  jax.effects_barrier()
