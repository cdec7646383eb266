import math, jax, jax.numpy as jnp, numpy as np, optax
import adafisher_optax as afo
import sys; sys.path.insert(0,'tests')
from models import MLP, batch, loss_fn
jax.config.update('jax_enable_x64', True)
m=MLP(); x,y=batch(jax.random.key(0),(8,5)); x=x.astype(jnp.float64)
p=jax.tree.map(lambda a:a.astype(jnp.float64), m.init(jax.random.key(1),x)['params'])
_,g,c=afo.value_and_grad_with_curvature(loss_fn(m))(p,x,y)
for a in [0.0, 0.1, 1.0, math.inf]:
  tx=afo.scale_by_adafisher(relative_damping=a, t_cov=1)
  u,st=tx.update(g,tx.init(p),p,curvature=c)
  f=st.factors['head']; h,s=np.asarray(f.input),np.asarray(f.output)
  K=h[:,None]*s[None]; mean=K.mean()
  F=(K+a*mean)/((1+a)*mean) if a!=math.inf else np.ones_like(K)
  want_w = np.asarray(g['head']['kernel'])/F[:-1]; want_b=np.asarray(g['head']['bias'])/F[-1]
  print(a, np.max(np.abs(u['head']['kernel']-want_w)), np.max(np.abs(u['head']['bias']-want_b)), F.mean())
for ab in ['layer_mean','permuted']:
  tx=afo.scale_by_adafisher(ablation=ab, t_cov=1)
  u,st=tx.update(g,tx.init(p),p,curvature=c)
  F=np.asarray(g['head']['kernel'])/np.asarray(u['head']['kernel'])
  print(ab, F.min(), F.max())
