import time, jax, jax.numpy as jnp, numpy as np
x = jax.random.normal(jax.random.key(0), (128, 28, 28, 32))
fs = {
 'sum012': lambda x: jnp.sum(x, axis=(0,1,2)),
 'sum012_sq': lambda x: jnp.sum(x*x, axis=(0,1,2)),
 'gemv': lambda x: jnp.ones((x.size // x.shape[-1],)) @ x.reshape(-1, x.shape[-1]),
 'gemv2': lambda x: jnp.ones((x.size // x.shape[-1],)) @ jnp.concatenate([x, x*x], -1).reshape(-1, 2*x.shape[-1]),
 'two_sums': lambda x: (jnp.sum(x, axis=(0,1,2)), jnp.sum(x*x, axis=(0,1,2))),
}
fs = {k: jax.jit(f) for k, f in fs.items()}
for f in fs.values(): jax.block_until_ready(f(x))
t = {k: [] for k in fs}
for r in range(15):
  for k, f in fs.items():
    t0 = time.perf_counter(); jax.block_until_ready(f(x)); t[k].append(time.perf_counter()-t0)
print({k: round(float(np.median(v))*1e3, 2) for k, v in t.items()})
