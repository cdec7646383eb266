import re, functools
text=open('docs/performance.md').read()
code=re.findall(r'^```python\n(.*?)^```', text, flags=re.S|re.M)[0]
code=code.split("adam, adafisher =")[0]
exec(code)
import optax, adafisher_optax as afo
def hlo(step, tx, donate, **static):
  program = jax.jit(functools.partial(step, tx, **static), donate_argnums=(0,1) if donate else ())
  return program.lower(params, tx.init(params), x, y).compile().as_text()
def entry(h):
  e=h[h.index('\nENTRY'):]; e=e[:e.index('\n}')]
  return [l.strip()[:110] for l in e.splitlines()[1:]]
for donate in (False, True):
  a=hlo(adam_step, optax.adam(1e-3), donate); p=hlo(adafisher_step, afo.adafisher(1e-3), donate, refresh=False)
  print(donate, kernel_count(a), kernel_count(p))
  print([l for l in entry(p) if ' copy(' in l or 'copy-start' in l])
