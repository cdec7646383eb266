"""Kernel counts of compiled train steps: Adam vs AdaFisher plain/refresh."""
import collections, re, sys, time
import jax, jax.numpy as jnp, optax, numpy as np
import adafisher_optax as afo
from benchmarks.models import MLP, ResNet, CharGPT

NOT_KERNELS = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'after-all', 'partition-id', 'replica-id'}

def count(text):
  entry = text[text.index('ENTRY'):]
  entry = entry[: entry.index('\n}')]
  ops = collections.Counter()
  for line in entry.splitlines()[1:]:
    m = re.search(r'= [^ ]+ ([a-z\-]+)\(', line) or re.search(r'= \([^)]*\) ([a-z\-]+)\(', line)
    if not m:
      m = re.search(r' ([a-z\-]+)\(', line)
    if m and m.group(1) not in NOT_KERNELS:
      ops[m.group(1)] += 1
  return sum(ops.values()), ops

def workloads():
  k = jax.random.key(0)
  yield 'mlp', MLP(), jax.random.normal(k, (256, 28, 28, 1)), jax.random.randint(k, (256,), 0, 10)
  yield 'cnn', ResNet(), jax.random.normal(k, (128, 28, 28, 1)), jax.random.randint(k, (128,), 0, 10)
  yield 'gpt', CharGPT(vocab=78, max_len=128), jax.random.randint(k, (32, 128), 0, 78), jax.random.randint(k, (32, 128), 0, 78)

def loss_of(model, state_keys):
  def loss(params, model_state, x, y):
    if model_state:
      logits, new = model.apply({'params': params, **model_state}, x, mutable=list(model_state))
    else:
      logits, new = model.apply({'params': params}, x), model_state
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
  return loss

def main(names):
  for name, model, x, y in workloads():
    if names and name not in names: continue
    v = model.init(jax.random.key(1), x)
    params = v['params']; ms = {k: w for k, w in v.items() if k != 'params'}
    loss = loss_of(model, ms)
    rows = {}
    adam = optax.adam(1e-3)
    def adam_step(p, ms, s, x, y):
      (l, ms), g = jax.value_and_grad(loss, has_aux=True)(p, ms, x, y)
      u, s = adam.update(g, s, p)
      return optax.apply_updates(p, u), ms, s, l
    progs = {'adam': (jax.jit(adam_step, donate_argnums=(0,1,2)), adam.init(params))}
    gf = afo.value_and_grad_with_curvature(loss, has_aux=True)
    layout = afo.curvature_layout(gf, params, ms, x, y)
    for tcov in (100,):
      tx = afo.adafisher(1e-3, layout=layout, t_cov=tcov)
      for refresh in (False, True):
        def step(p, ms, s, x, y, refresh=refresh):
          (l, ms), g, c = gf(p, ms, x, y, capture=refresh)
          u, s = tx.update(g, s, p, curvature=c)
          return optax.apply_updates(p, u), ms, s, l
        progs['plain' if not refresh else 'refresh'] = (jax.jit(step, donate_argnums=(0,1,2)), tx.init(params))
    for label, (fn, s) in progs.items():
      text = fn.lower(params, ms, s, x, y).compile().as_text()
      n, ops = count(text)
      rows[label] = (n, ops)
    print(name, {k: v[0] for k, v in rows.items()})
    for k in ('adam', 'plain'):
      print('  ', k, dict(rows[k][1].most_common(8)))

if "time" not in sys.argv: main(sys.argv[1:])

def timing(names, rounds=10, steps=5):
  for name, model, x, y in workloads():
    if names and name not in names: continue
    v = model.init(jax.random.key(1), x)
    params = v['params']; ms = {k: w for k, w in v.items() if k != 'params'}
    loss = loss_of(model, ms)
    adam = optax.adam(1e-3)
    def adam_step(p, ms, s, x, y):
      (l, ms), g = jax.value_and_grad(loss, has_aux=True)(p, ms, x, y)
      u, s = adam.update(g, s, p)
      return optax.apply_updates(p, u), ms, s, l
    gf = afo.value_and_grad_with_curvature(loss, has_aux=True)
    layout = afo.curvature_layout(gf, params, ms, x, y)
    tx = afo.adafisher(1e-3, layout=layout)
    def make(refresh):
      def step(p, ms, s, x, y):
        (l, ms), g, c = gf(p, ms, x, y, capture=refresh)
        u, s = tx.update(g, s, p, curvature=c)
        return optax.apply_updates(p, u), ms, s, l
      return jax.jit(step)
    progs = {'adam': (jax.jit(adam_step), adam.init(params)), 'plain': (make(False), tx.init(params)), 'refresh': (make(True), tx.init(params))}
    states = {k: [params, ms, s] for k, (f, s) in progs.items()}
    for k, (f, _) in progs.items():
      out = f(*states[k], x, y); jax.block_until_ready(out)
    times = collections.defaultdict(list)
    for r in range(rounds):
      for k, (f, _) in progs.items():
        p, m, s = states[k]
        t0 = time.perf_counter()
        for _ in range(steps):
          p, m, s, l = f(p, m, s, x, y)
        jax.block_until_ready(l)
        times[k].append((time.perf_counter() - t0) / steps)
        states[k] = [p, m, s]
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(name, {k: round(v * 1e3, 2) for k, v in med.items()}, 'ratios', {k: round(med[k] / med['adam'], 3) for k in med})

if __name__ == '__main__' and 'time' in sys.argv:
  timing([a for a in sys.argv[1:] if a != 'time'])
