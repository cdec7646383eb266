import time, jax, jax.numpy as jnp, numpy as np
x = jax.random.normal(jax.random.key(0), (128, 28, 28, 32))
M = jnp.asarray(np.random.rand(28, 3) > 0.5, jnp.float32)
def a(x):
  s = jnp.einsum('bhwc,wy->bhyc', x*x, M)
  s = jnp.einsum('bhyc,hx->bxyc', s, M)
  return s.sum(0)
def b(x):
  s = jnp.einsum('bhwc,wy->bhyc', x*x, M)
  return jnp.einsum('bhyc,hx->xyc', s, M)
def c(x):
  s = jnp.einsum('bhwc,hx->bxwc', x*x, M)
  s = jnp.einsum('bxwc,wy->bxyc', s, M)
  return s.sum(0)
def d(x):  # two-stage: per-example full sums via dot on flattened (h w)
  sq = (x*x).reshape(x.shape[0], -1, x.shape[-1])   # b, hw, c
  K = jnp.einsum('hx,wy->hwxy', M, M).reshape(-1, 9)  # hw, 9
  s = jnp.einsum('bpc,pk->bkc', sq, K)
  return s.sum(0)
def e(x):
  sq = (x*x).reshape(x.shape[0], -1, x.shape[-1])
  K = jnp.einsum('hx,wy->hwxy', M, M).reshape(-1, 9)
  return jnp.einsum('bpc,pk->kc', sq, K)
fs = {k: jax.jit(f) for k, f in dict(a=a, b=b, c=c, d=d, e=e).items()}
r0 = fs['a'](x)
for k, f in fs.items(): print(k, float(jnp.max(jnp.abs(f(x).reshape(-1) - r0.reshape(-1)))))
t = {k: [] for k in fs}
for r in range(15):
  for k, f in fs.items():
    t0 = time.perf_counter(); jax.block_until_ready(f(x)); t[k].append(time.perf_counter()-t0)
print({k: round(float(np.median(v))*1e3, 2) for k, v in t.items()})
