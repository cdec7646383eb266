import jax, jax.numpy as jnp, flax.linen as nn
from adafisher_optax import _tree
class _Cell(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return jnp.tanh(nn.Dense(carry.shape[-1], name='dense')(carry)), None
model = nn.scan(_Cell, variable_axes={'params': 0}, split_rngs={'params': True}, length=3)()
x = jnp.ones((4,5))
p = model.init(jax.random.key(0), x, None)['params']
def intercept(next_fun, args, kwargs, ctx):
  m = ctx.module
  print(type(m).__name__, m.path, ctx.method_name, m.scope is m.scope.root, jax.tree.map(jnp.shape, dict(m.scope.root._variables)), m.scope.name, m.is_mutable_collection('params'), m.scope.invalid)
  return next_fun(*args, **kwargs)
with nn.intercept_methods(intercept):
  model.apply({'params': p}, x, None)
