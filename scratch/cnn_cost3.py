import sys, time, collections
import jax, jax.numpy as jnp, optax, numpy as np
import flax.linen as nn
sys.path.insert(0, '.')
import adafisher_optax as afo
from benchmarks.models import ResNet
k = jax.random.key(0)
model = ResNet(); x = jax.random.normal(k, (128, 28, 28, 1)); y = jax.random.randint(k, (128,), 0, 10)
v = model.init(k, x); params = v['params']; ms = {'batch_stats': v['batch_stats']}
def loss(p, ms, x, y):
  logits, new = model.apply({'params': p, **ms}, x, mutable=['batch_stats'])
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
def make(layers, numerics='reference'):
  gf = afo.value_and_grad_with_curvature(loss, has_aux=True, layers=layers)
  layout = afo.curvature_layout(gf, params, ms, x, y)
  tx = afo.adafisher(1e-3, layout=layout, t_cov=1, numerics=numerics)
  def step(p, ms, s):
    (l, ms), g, c = gf(p, ms, x, y, capture=True)
    u, s = tx.update(g, s, p, curvature=c); return optax.apply_updates(p, u), ms, s, l
  def plain(p, ms, s):
    (l, ms), g, c = gf(p, ms, x, y, capture=False)
    u, s = tx.update(g, s, p); return optax.apply_updates(p, u), ms, s, l
  return step, plain, tx
import warnings; warnings.simplefilter('ignore')
variants = {'all': None, 'conv': [nn.Conv], 'bn': [nn.BatchNorm], 'dense': [nn.Dense]}
fs, st = {}, {}
for name, layers in variants.items():
  step, plain, tx = make(layers)
  fs[name] = jax.jit(step); st[name] = [params, ms, tx.init(params)]
  if name == 'all':
    fs['plain'] = jax.jit(plain); st['plain'] = [params, ms, tx.init(params)]
for kk, f in fs.items(): st[kk] = list(f(*st[kk])[:3])
t = collections.defaultdict(list)
rng = np.random.default_rng(0)
for r in range(0):
  for kk in rng.permutation(list(fs)):
    t0 = time.perf_counter(); out = fs[kk](*st[kk]); jax.block_until_ready(out); t[kk].append(time.perf_counter() - t0); st[kk] = list(out[:3])
m = {kk: np.median(v) for kk, v in t.items()}
#print({kk: round(v/m['plain'], 3) for kk, v in m.items()})
for name, layers in variants.items():
  step, plain, tx = make(layers)
  for label, f in (('refresh', step), ('plain', plain)):
    if label == 'plain' and name != 'all': continue
    c = jax.jit(f).lower(params, ms, tx.init(params)).compile()
    a = c.cost_analysis(); a = a[0] if isinstance(a, list) else a
    print(name, label, 'GB', round(a['bytes accessed']/1e9, 3), 'GFLOP', round(a['flops']/1e9, 3))
