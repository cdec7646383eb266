import sys; sys.path.insert(0, 'tests')
import jax, jax.numpy as jnp, optax, numpy as np
import adafisher_optax as afo
from models import MLP, ConvNet, batch, loss_fn, make_step
m = ConvNet(); x, y = batch(jax.random.key(0), (8, 6, 6, 2))
p = m.init(jax.random.key(1), x)['params']
grad_fn = afo.value_and_grad_with_curvature(loss_fn(m))
loss, g, c = grad_fn(p, x, y)
print(loss, jax.tree.map(jnp.shape, c))
tx = afo.adafisher(1e-2, t_cov=2)
s = tx.init(p)
step = jax.jit(make_step(m, tx))
for i in range(4):
  p, s, l = step(p, s, x, y); print(float(l))
print(afo.diagnostics(s, p))
