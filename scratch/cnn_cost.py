import sys, time, collections
import jax, jax.numpy as jnp, optax, numpy as np
sys.path.insert(0, '.')
import adafisher_optax as afo
from adafisher_optax import rules
from benchmarks.models import ResNet
variant = sys.argv[1]
if variant == 'no_xhat':
  orig = rules.NormRule.statistics
  def stats(self, config, inputs, outputs, weight, bias):
    app = orig(self, config, inputs, outputs, weight, bias)
    z, xh, b = app.input_sums
    return rules.Application((z, jnp.zeros_like(xh), b), app.rows, app.output_sums)
  rules.NormRule.statistics = stats
if variant == 'no_conv':
  rules.RULES.pop('conv')
k = jax.random.key(0)
model = ResNet(); x = jax.random.normal(k, (128, 28, 28, 1)); y = jax.random.randint(k, (128,), 0, 10)
v = model.init(k, x); params = v['params']; ms = {'batch_stats': v['batch_stats']}
def loss(p, ms, x, y):
  logits, new = model.apply({'params': p, **ms}, x, mutable=['batch_stats'])
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
gf = afo.value_and_grad_with_curvature(loss, has_aux=True)
adam = optax.adam(1e-3)
def adam_step(p, ms, s):
  (l, ms), g = jax.value_and_grad(loss, has_aux=True)(p, ms, x, y)
  u, s = adam.update(g, s, p); return optax.apply_updates(p, u), ms, s, l
def cap_step(p, ms, s):
  (l, ms), g, c = gf(p, ms, x, y)
  u, s = adam.update(g, s, p); return optax.apply_updates(p, u), ms, s, l
fs = {'adam': jax.jit(adam_step), 'capture': jax.jit(cap_step)}
st = {kk: [params, ms, adam.init(params)] for kk in fs}
for kk, f in fs.items(): jax.block_until_ready(f(*st[kk]))
t = collections.defaultdict(list)
for r in range(8):
  for kk, f in fs.items():
    t0 = time.perf_counter()
    out = f(*st[kk]); jax.block_until_ready(out); t[kk].append(time.perf_counter() - t0)
m = {kk: np.median(v) for kk, v in t.items()}
print(variant, {kk: round(v*1e3,1) for kk, v in m.items()}, 'ratio', round(m['capture']/m['adam'], 3))
