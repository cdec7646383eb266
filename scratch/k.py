import re, functools
text=open('docs/performance.md').read()
code=re.findall(r'^```python\n(.*?)^```', text, flags=re.S|re.M)[0]
code=code.split("adam, adafisher =")[0]
exec(code)
import optax, adafisher_optax as afo
def hlo(step, tx, **static):
  program = jax.jit(functools.partial(step, tx, **static), donate_argnums=(0,1))
  return program.lower(params, tx.init(params), x, y).compile().as_text()
a=hlo(adam_step, optax.adam(1e-3)); p=hlo(adafisher_step, afo.adafisher(1e-3), refresh=False)
print(kernel_count(a), kernel_count(p))
def entry(h):
  e=h[h.index('\nENTRY'):]; e=e[:e.index('\n}')]
  return [l.strip()[:150] for l in e.splitlines()[1:]]
print('\n'.join(entry(p)))
print('=====ADAM')
print('\n'.join(entry(a)))
