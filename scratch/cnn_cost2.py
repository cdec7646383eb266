import sys, time, collections
import jax, jax.numpy as jnp, optax, numpy as np
sys.path.insert(0, '.')
import adafisher_optax as afo
from benchmarks.models import ResNet
k = jax.random.key(0)
model = ResNet(); x = jax.random.normal(k, (128, 28, 28, 1)); y = jax.random.randint(k, (128,), 0, 10)
v = model.init(k, x); params = v['params']; ms = {'batch_stats': v['batch_stats']}
def loss(p, ms, x, y):
  logits, new = model.apply({'params': p, **ms}, x, mutable=['batch_stats'])
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
gf = afo.value_and_grad_with_curvature(loss, has_aux=True)
layout = afo.curvature_layout(gf, params, ms, x, y)
tx = afo.adafisher(1e-3, layout=layout, t_cov=1)
adam = optax.adam(1e-3)
def adam_step(p, ms, s):
  (l, ms), g = jax.value_and_grad(loss, has_aux=True)(p, ms, x, y)
  u, s = adam.update(g, s, p); return optax.apply_updates(p, u), ms, s, l
def cap_adam(p, ms, s):
  (l, ms), g, c = gf(p, ms, x, y)
  u, s = adam.update(g, s, p); return optax.apply_updates(p, u), ms, s, l
def plain(p, ms, s):
  (l, ms), g, c = gf(p, ms, x, y, capture=False)
  u, s = tx.update(g, s, p); return optax.apply_updates(p, u), ms, s, l
def refresh(p, ms, s):
  (l, ms), g, c = gf(p, ms, x, y)
  u, s = tx.update(g, s, p, curvature=c); return optax.apply_updates(p, u), ms, s, l
def refresh_barrier(p, ms, s):
  (l, ms), g, c = gf(p, ms, x, y)
  g, c = jax.lax.optimization_barrier((g, c))
  u, s = tx.update(g, s, p, curvature=c); return optax.apply_updates(p, u), ms, s, l
def refresh_adamlike(p, ms, s):
  (l, ms), g, c = gf(p, ms, x, y)
  u, s2 = tx.update(g, s, p, curvature=c)
  u2, _ = tx.update(g, s, p)
  return optax.apply_updates(p, u2), ms, s2, l
fs = {'adam': (adam_step, adam), 'refresh': (refresh, tx), 'barrier': (refresh_barrier, tx), 'stale_update': (refresh_adamlike, tx)}
st = {kk: [params, ms, o.init(params)] for kk, (f, o) in fs.items()}
fs = {kk: jax.jit(f) for kk, (f, o) in fs.items()}
for kk, f in fs.items(): st[kk] = list(f(*st[kk])[:3])
t = collections.defaultdict(list)
rng = np.random.default_rng(0)
for r in range(int(sys.argv[1]) if sys.argv[1:2] and sys.argv[1].isdigit() else 0):
  for kk in rng.permutation(list(fs)):
    f = fs[kk]
    t0 = time.perf_counter()
    out = f(*st[kk]); jax.block_until_ready(out); t[kk].append(time.perf_counter() - t0)
    st[kk] = list(out[:3])
m = {kk: np.median(v) for kk, v in t.items()}
print({kk: round(v*1e3,1) for kk, v in m.items()}, {kk: round(v/m['adam'], 3) for kk, v in m.items()})

if 'cost' in sys.argv:
  fs2 = {'adam': adam_step, 'cap_adam': cap_adam, 'plain': plain, 'refresh': refresh, 'barrier': refresh_barrier}
  for kk, f in fs2.items():
    o = adam if kk in ('adam', 'cap_adam') else tx
    c = jax.jit(f).lower(params, ms, o.init(params)).compile()
    a = c.cost_analysis(); a = a[0] if isinstance(a, list) else a
    print(kk, 'GB', round(a['bytes accessed']/1e9, 3), 'GFLOP', round(a['flops']/1e9, 2), 'transcendentals', a.get('transcendentals'))
