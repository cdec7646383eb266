import sys, time, collections
import jax, jax.numpy as jnp, optax, numpy as np
sys.path.insert(0, '.'); sys.path.insert(0, 'scratch')
import adafisher_optax as afo
from benchmarks.models import ResNet
from hlo import count
k = jax.random.key(0)
model = ResNet(); x = jax.random.normal(k, (128, 28, 28, 1)); y = jax.random.randint(k, (128,), 0, 10)
v = model.init(k, x); params = v['params']; ms = {'batch_stats': v['batch_stats']}
def loss(p, ms, x, y):
  logits, new = model.apply({'params': p, **ms}, x, mutable=['batch_stats'])
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
gf = afo.value_and_grad_with_curvature(loss, has_aux=True)
(l, _), g, c = jax.jit(gf)(params, ms, x, y)
layout = afo.curvature_layout(gf, params, ms, x, y)
for numerics in ('reference', 'paper'):
  tx = afo.adafisher(1e-3, layout=layout, t_cov=1, numerics=numerics)
  s = tx.init(params)
  adam = optax.adam(1e-3)
  fs = {'adam': (jax.jit(lambda g, s, p: adam.update(g, s, p)), adam.init(params), ()),
        'plain': (jax.jit(lambda g, s, p: tx.update(g, s, p)), s, ()),
        'refresh': (jax.jit(lambda g, s, p, c: tx.update(g, s, p, curvature=c)), s, (c,))}
  for kk, (f, st, extra) in fs.items():
    n, ops = count(f.lower(g, st, params, *extra).compile().as_text())
    jax.block_until_ready(f(g, st, params, *extra))
    ts = []
    for _ in range(30):
      t0 = time.perf_counter(); jax.block_until_ready(f(g, st, params, *extra)); ts.append(time.perf_counter() - t0)
    print(numerics, kk, n, round(np.median(ts)*1e3, 2), 'ms', dict(ops.most_common(4)))
