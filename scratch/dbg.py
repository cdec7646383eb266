import jax, jax.numpy as jnp, flax.linen as nn
from adafisher_optax import _tree
m = nn.Dense(3)
x = jnp.ones((2,4))
p = m.init(jax.random.key(0), x)['params']
def intercept(next_fun, args, kwargs, ctx):
  v = ctx.module.variables['params']
  print([ (k, id(l), type(l).__name__) for k, l in _tree.leaves_with_paths(v)])
  print('scope', [ (k, id(l)) for k, l in _tree.leaves_with_paths(ctx.module.scope._variables['params'])])
  return next_fun(*args, **kwargs)
def f(p):
  print('in', [(k, id(l)) for k, l in _tree.leaves_with_paths(p)])
  with nn.intercept_methods(intercept):
    return m.apply({'params': p}, x).sum()
jax.eval_shape(f, p)
