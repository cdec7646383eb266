import time, jax, jax.numpy as jnp, numpy as np
x = jax.random.normal(jax.random.key(0), (128, 28, 28, 32))
M = jnp.asarray(np.random.rand(28, 3) > 0.5, jnp.float32)
fs = {
 'sum0': lambda x: jnp.sum(x*x, 0),
 'gemv': lambda x: (jnp.ones((1, x.shape[0])) @ (x*x).reshape(x.shape[0], -1)).reshape(x.shape[1:]),
 'einsum_ones': lambda x: jnp.einsum('bhwc,b,hx,wy->xyc', x*x, jnp.ones(x.shape[0]), M, M),
 'einsum_hb': lambda x: jnp.einsum('bhwc,hx->xwc', x*x, M),
 'sum_last': lambda x: jnp.sum((x*x).reshape(x.shape[0], -1), 1),
 'sum_all': lambda x: jnp.sum(x*x),
}
fs = {k: jax.jit(f) for k, f in fs.items()}
for f in fs.values(): jax.block_until_ready(f(x))
t = {k: [] for k in fs}
for r in range(15):
  for k, f in fs.items():
    t0 = time.perf_counter(); jax.block_until_ready(f(x)); t[k].append(time.perf_counter()-t0)
print({k: round(float(np.median(v))*1e3, 2) for k, v in t.items()})
