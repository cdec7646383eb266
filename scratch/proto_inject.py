import jax, jax.numpy as jnp, flax.linen as nn, numpy as np
from flax.core import scope as scope_lib

PROBE='__probe__'
state = {'depth': 0, 'log': []}

def add_probes(params, probes):
  # params: dict at root; probes: {rel_path: value}
  params = jax.tree.map(lambda x: x, params, is_leaf=lambda x: not isinstance(x, dict))
  params = dict(params)
  for path, v in probes.items():
    node = params
    for k in path[:-1]:
      node[k] = dict(node[k]); node = node[k]
    node[path[-1]] = v
  return params

def interceptor(next_fun, args, kwargs, context):
  m = context.module
  if state['depth'] == 0 and not m.is_initializing():
    state['depth'] += 1
    try:
      probes = state['probes']
      name = context.method_name
      def call(mdl, *a, **k):
        return getattr(mdl, name)(*a, **k) if name != '__call__' else mdl(*a, **k)
      mapped = nn.map_variables(call, 'params', trans_in_fn=lambda t: {**t, 'params': add_probes(t['params'], probes)}, mutable=False)
      return mapped(m, *args, **kwargs)
    finally:
      state['depth'] -= 1
  if isinstance(m, nn.Dense):
    p = m.get_variable('params', PROBE)
    state['log'].append((m.path, None if p is None else jnp.shape(p)))
  return next_fun(*args, **kwargs)

class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    x = nn.Dense(4, name='dense')(x)
    x = nn.Dropout(0.5, deterministic=False)(x)
    return jnp.tanh(x), None

class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4, name='inp')(x)
    x = nn.BatchNorm(use_running_average=False, name='bn')(x)
    x = nn.Dropout(0.5, deterministic=False)(x)
    x, _ = nn.scan(nn.remat(Block), variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True}, length=3)(name='blocks')(x, None)
    return x

m = Model()
x = jnp.ones((2, 4))
v = m.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x)
params = v['params']
print(jax.tree.map(jnp.shape, params))
def f(params):
  return m.apply({'params': params, 'batch_stats': v['batch_stats']}, x, rngs={'dropout': jax.random.key(5)}, mutable=['batch_stats'])
plain = f(params)
state['probes'] = {('inp', PROBE): jnp.zeros(3), ('blocks','dense',PROBE): jnp.zeros((3, 7))}
with nn.intercept_methods(interceptor):
  got = f(params)
print(state['log'])
print(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a-b))), plain, got))
