import jax, jax.numpy as jnp, flax.linen as nn
class _Cell(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return jnp.tanh(nn.Dense(carry.shape[-1], name='dense')(carry)), None
model = nn.scan(_Cell, variable_axes={'params': 0}, split_rngs={'params': True}, length=3)()
x = jnp.ones((4,5))
p = model.init(jax.random.key(0), x, None)['params']
def intercept(next_fun, args, kwargs, ctx):
  m = ctx.module
  import inspect
  f = ctx.orig_method.func
  print(type(m).__name__, ctx.method_name, f, inspect.getsourcefile(f), inspect.getsourcelines(f)[1])
  return next_fun(*args, **kwargs)
with nn.intercept_methods(intercept):
  model.apply({'params': p}, x, None)
