import collections, re, sys
import jax, jax.numpy as jnp, optax
import adafisher_optax as afo
sys.path.insert(0, '.')
from benchmarks.models import MLP
from scratch.hlo import count
k = jax.random.key(0)
model = MLP(); x = jax.random.normal(k, (256, 28, 28, 1)); y = jax.random.randint(k, (256,), 0, 10)
params = model.init(k, x)['params']
def loss(p, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model.apply({'params': p}, x), y).mean()
gf = afo.value_and_grad_with_curvature(loss)
tx = afo.adafisher(1e-3, t_cov=1)
def cap_only(p, x, y):
  return gf(p, x, y)
def plain_grad(p, x, y):
  return jax.value_and_grad(loss)(p, x, y)
def upd_refresh(g, s, p, c):
  return tx.update(g, s, p, curvature=c)
def upd_plain(g, s, p):
  return tx.update(g, s, p)
s = tx.init(params)
_, g, c = gf(params, x, y)
for name, f, args in [('grad', plain_grad, (params, x, y)), ('capture', cap_only, (params, x, y)), ('update_plain', upd_plain, (g, s, params)), ('update_refresh', upd_refresh, (g, s, params, c))]:
  n, ops = count(jax.jit(f).lower(*args).compile().as_text())
  print(name, n, dict(ops.most_common(6)))
