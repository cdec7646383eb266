import time, jax, jax.numpy as jnp, numpy as np
from adafisher_optax import rules
cfg = rules.Conv(kernel_size=(3,3), strides=(1,1), padding='SAME', input_dilation=(1,1), kernel_dilation=(1,1))
x = jax.random.normal(jax.random.key(0), (128, 28, 28, 32))
y = jnp.zeros((128, 28, 28, 32))
def einsum_h(x):
  return rules.CONV.statistics(cfg, x, y, None, None).input_sums[0]
def window_h(x):
  def ws(sq):
    sq, pads = rules.conv_input_padding(cfg, sq[None]); sq = sq[0]
    w = jax.lax.reduce_window(sq, 0., jax.lax.add, (28, 28, 1), (1,1,1), tuple(pads)+((0,0),), None, (1,1,1))
    return w[:3,:3]
  return jnp.sum(jax.vmap(ws)(x*x), 0)
def conv_op(x):
  k = jnp.ones((3,3,32,32))
  return jax.lax.conv_general_dilated(x, k, (1,1), 'SAME', dimension_numbers=('NHWC','HWIO','NHWC'))
fs = {k: jax.jit(f) for k, f in dict(einsum=einsum_h, window=window_h, conv=conv_op).items()}
for f in fs.values(): jax.block_until_ready(f(x))
t = {k: [] for k in fs}
for r in range(15):
  for k, f in fs.items():
    t0 = time.perf_counter(); jax.block_until_ready(f(x)); t[k].append(time.perf_counter()-t0)
print({k: round(float(np.median(v))*1e3, 2) for k, v in t.items()})
fs2 = {'sq': jax.jit(lambda x: x*x), 'sqsum': jax.jit(lambda x: jnp.sum(x*x, 0)), 'einsum': fs['einsum']}
for f in fs2.values(): jax.block_until_ready(f(x))
t = {k: [] for k in fs2}
for r in range(15):
  for k, f in fs2.items():
    t0 = time.perf_counter(); jax.block_until_ready(f(x)); t[k].append(time.perf_counter()-t0)
print({k: round(float(np.median(v))*1e3, 2) for k, v in t.items()})
print(jax.jit(einsum_h).lower(x).compile().as_text()[-3000:])
