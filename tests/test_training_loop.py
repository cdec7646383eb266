"""The training loop around the optimizer: schedules, restores, accumulation,
wrappers and diagnostics (issue 18: the silent paths of the two-program
loop). Silent results are checked numerically, errors by their message."""

import functools
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import adafisher_optax as afo
from adafisher_optax import state as state_lib

from models import MLP, batch, loss_fn


@pytest.fixture
def problem():
  model = MLP()
  batches = [batch(jax.random.key(i), (8, 5)) for i in range(12)]
  params = model.init(jax.random.key(0), batches[0][0])['params']
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model))
  return params, batches, grad_fn


def _train_step(tx, grad_fn):
  """The README's jitted step (``refresh`` static) for ``tx``."""

  @functools.partial(jax.jit, static_argnames='refresh')
  def step(params, state, x, y, refresh):
    _, grads, curvature = grad_fn(params, x, y, capture=refresh)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state

  return step


def _loop(tx, params, batches, grad_fn, flags, state=None):
  """Runs ``tx`` over ``batches``, capturing where ``flags`` say."""
  state = tx.init(params) if state is None else state
  step = _train_step(tx, grad_fn)
  for (x, y), refresh in zip(batches, flags):
    params, state = step(params, state, x, y, refresh)
  return params, state


def _refreshed_at(tx, params, batches, grad_fn, schedule, state=None):
  """The update counts at which the factors were refreshed."""
  state = tx.init(params) if state is None else state
  step = _train_step(tx, grad_fn)
  seen = []
  for (x, y), refresh in zip(batches, schedule):
    params, state = step(params, state, x, y, refresh)
    inner = afo.adafisher_state(state)
    if 0 <= int(inner.last_refresh) == int(inner.count) - 1:
      seen.append(int(inner.last_refresh))
  return sorted(set(seen)), state


# --- refresh_schedule follows the optimizer that runs -----------------------


def test_a_refresh_no_layer_takes_stays_due(problem):
  """A non-finite batch on a refresh step: every layer skips it, so the
  refresh stays due (the next curvature refreshes, overdue counts) instead
  of counting as done and leaving F~ = 1 for t_cov updates."""
  params, batches, grad_fn = problem
  poisoned = [(batches[0][0].at[0, 0].set(jnp.nan), batches[0][1])]
  tx = afo.adafisher(1e-3, t_cov=4)
  _, state = _loop(tx, params, poisoned, grad_fn, [True])
  inner = afo.adafisher_state(state)
  assert int(inner.last_refresh) == -1
  assert all(int(f.skipped) == 1 for f in inner.factors.values())
  assert afo.diagnostics(state, params).overdue == 1
  seen, state = _refreshed_at(
    tx, params, batches[1:6], grad_fn, [True] * 5, state=state
  )
  assert seen == [1, 5]  # at once, then t_cov later
  inner = afo.adafisher_state(state)
  assert all(int(f.refreshes) == 2 for f in inner.factors.values())
  # One layer skipping does not hold the others' refresh back.
  partial = tx.init(params)
  _, grads, curvature = grad_fn(params, *batches[0])
  curvature['head'] = jax.tree.map(lambda a: a * jnp.nan, curvature['head'])
  _, partial = tx.update(grads, partial, params, curvature=curvature)
  inner = afo.adafisher_state(partial)
  assert int(inner.last_refresh) == 0
  assert int(inner.factors['head'].refreshes) == 0
  assert int(inner.factors['dense0'].refreshes) == 1


def _saved_at_t_cov_4(params, batches, grad_fn, path):
  old = afo.adafisher(1e-3, t_cov=4)
  _, state = _loop(old, params, batches[:5], grad_fn, [True] * 5)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, {'opt_state': state})
    checkpointer.wait_until_finished()
  return state


@pytest.mark.parametrize('restore', ['afo', 'orbax'])
def test_schedule_after_restore_follows_the_new_t_cov(
  problem, tmp_path, restore
):
  params, batches, grad_fn = problem
  _saved_at_t_cov_4(params, batches, grad_fn, tmp_path / 'ckpt')
  new = afo.adafisher(1e-3, t_cov=2)
  target = {'opt_state': new.init(params)}
  if restore == 'afo':
    restored = afo.checkpoint.restore(tmp_path / 'ckpt', target)
  else:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(tmp_path / 'ckpt', target)
  state = restored['opt_state']  # count 5, refreshed at 0 and 4
  schedule = afo.refresh_schedule(state)
  assert [next(schedule) for _ in range(5)] == [False, True, False, True, False]
  refreshed, _ = _refreshed_at(
    new, params, batches[5:], grad_fn, afo.refresh_schedule(state), state
  )
  assert refreshed == [6, 8, 10]


def test_a_state_of_another_t_cov_warns_and_takes_the_new_one(problem):
  params, batches, grad_fn = problem
  old = afo.adafisher(1e-3, t_cov=4)
  _, state = _loop(old, params, batches[:1], grad_fn, [True])
  new = afo.adafisher(1e-3, t_cov=2)
  _, grads, _ = grad_fn(params, *batches[1])
  with pytest.warns(afo.StaleFactorsWarning, match='t_cov=4.*every 2'):
    _, state = new.update(grads, state, params)
  assert afo.adafisher_state(state).settings.t_cov == 2


def test_schedule_of_wrapped_states(problem):
  params, batches, grad_fn = problem
  for tx in (
    optax.chain(optax.clip_by_global_norm(1.0), afo.adafisher(1e-3, t_cov=3)),
    optax.inject_hyperparams(afo.adafisher, static_args=('t_cov',))(
      learning_rate=1e-3, t_cov=3
    ),
  ):
    schedule = afo.refresh_schedule(tx.init(params))
    assert [next(schedule) for _ in range(7)] == [True, False, False] * 2 + [
      True
    ]
    refreshed, _ = _refreshed_at(
      tx, params, batches[:7], grad_fn, afo.refresh_schedule(tx.init(params))
    )
    assert refreshed == [0, 3, 6]


def test_schedule_of_an_nnx_optimizer():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(5, 4, rngs=rngs)
      self.b = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
      return self.b(jnp.tanh(self.a(x)))

  net = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(net, afo.adafisher(1e-3, t_cov=2), wrt=nnx.Param)
  schedule = afo.refresh_schedule(optimizer.opt_state)
  assert [next(schedule) for _ in range(4)] == [True, False, True, False]


# --- multi_steps: flags per micro-batch, statistics per window ---------------


def _accumulating(params, batches, grad_fn, every_k=3, t_cov=2):
  layout = afo.curvature_layout(grad_fn, params, *batches[0])
  return afo.multi_steps(
    afo.adafisher(1e-3, t_cov=t_cov), every_k, layout=layout
  )


def test_multi_steps_schedule_yields_a_flag_per_micro_batch(problem):
  params, batches, grad_fn = problem
  tx = _accumulating(params, batches, grad_fn)
  schedule = afo.refresh_schedule(tx.init(params))
  flags = [next(schedule) for _ in range(12)]
  assert flags == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3
  refreshed, state = _refreshed_at(
    tx, params, batches, grad_fn, afo.refresh_schedule(tx.init(params))
  )
  assert refreshed == [0, 2]  # updates 0 and 2 (of 4), every t_cov = 2
  assert int(afo.adafisher_state(state).count) == 4


def test_multi_steps_schedule_with_a_schedule_of_micro_batches(problem):
  params, batches, grad_fn = problem
  layout = afo.curvature_layout(grad_fn, params, *batches[0])
  every_k = lambda step: jnp.where(step < 1, 2, 3)  # noqa: E731
  tx = afo.multi_steps(afo.adafisher(1e-3, t_cov=1), every_k, layout=layout)
  schedule = afo.refresh_schedule(tx.init(params))
  assert [next(schedule) for _ in range(8)] == [True] * 8
  _, state = _loop(tx, params, batches[:8], grad_fn, [True] * 8)
  assert int(afo.adafisher_state(state).count) == 3  # windows of 2, 3, 3


def test_no_schedule_inside_optax_multi_steps(problem):
  """optax.MultiSteps updates AdaFisher once per window with the last
  micro-batch's curvature, and its state does not hold the window length:
  a flag per call would land the refreshes on dropped micro-batches."""
  params, _, _ = problem
  for inner in (afo.adafisher(1e-3), optax.chain(afo.adafisher(1e-3))):
    state = optax.MultiSteps(inner, every_k_schedule=2).init(params)
    with pytest.raises(ValueError, match=r'optax.MultiSteps.*multi_steps\('):
      afo.refresh_schedule(state)


def test_multi_steps_schedule_after_a_restore_mid_window(problem):
  params, batches, grad_fn = problem
  tx = _accumulating(params, batches, grad_fn, t_cov=1)
  _, state = _loop(tx, params, batches[:4], grad_fn, [True] * 4)
  schedule = afo.refresh_schedule(state)  # 1 micro-batch into window 2
  assert [next(schedule) for _ in range(5)] == [True] * 5
  assert int(state.inner.mini_step) == 1


def test_multi_steps_inits_survive_a_donated_state(problem):
  """Each init has its own arrays: a step that donates one state leaves the
  next init (a second run, a restore target) usable."""
  params, batches, grad_fn = problem
  tx = _accumulating(params, batches, grad_fn)
  step = jax.jit(
    _train_step(tx, grad_fn), static_argnames='refresh', donate_argnums=(0, 1)
  )
  first = tx.init(params)
  step(jax.tree.map(jnp.copy, params), first, *batches[0], refresh=True)
  second = tx.init(params)
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(second))
  step(jax.tree.map(jnp.copy, params), second, *batches[0], refresh=True)


def test_a_window_without_curvature_at_its_end_leaves_no_statistics(problem):
  params, batches, grad_fn = problem
  tx = _accumulating(params, batches, grad_fn)
  # Window 1: curvature on its first two micro-batches only: no refresh,
  # and its partial sums must not reach window 2.
  _, leaky = _loop(
    tx, params, batches[:6], grad_fn, [True, True, False, True, True, True]
  )
  inner = afo.adafisher_state(leaky)
  assert int(inner.count) == 2 and int(inner.last_refresh) == 1
  # The same window 2 after a window 1 that captured nothing.
  _, clean = _loop(
    tx, params, batches[:6], grad_fn, [False, False, False, True, True, True]
  )
  chex.assert_trees_all_close(
    inner.factors, afo.adafisher_state(clean).factors, rtol=1e-6
  )
  chex.assert_trees_all_equal(
    leaky.curvature, jax.tree.map(jnp.zeros_like, leaky.curvature)
  )


# --- a loop that never passes curvature ---------------------------------------


@pytest.mark.parametrize('jit', [False, True])
def test_a_loop_that_never_passes_curvature_is_told(problem, monkeypatch, jit):
  params, batches, grad_fn = problem
  monkeypatch.setitem(state_lib._PLANNED, 'refreshes', False)
  tx = afo.adafisher(1e-3)
  update = jax.jit(tx.update) if jit else tx.update
  _, grads, _ = grad_fn(params, *batches[0], capture=False)
  with pytest.warns(afo.StaleFactorsWarning, match='never refreshed'):
    update(grads, tx.init(params), params)


def test_the_two_program_loop_is_not_told(problem, monkeypatch):
  params, batches, grad_fn = problem
  monkeypatch.setitem(state_lib._PLANNED, 'refreshes', False)
  tx = afo.adafisher(1e-3, t_cov=3)
  state = tx.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter('error', afo.StaleFactorsWarning)
    _loop(tx, params, batches[:4], grad_fn, afo.refresh_schedule(state))


# --- diagnostics report what the next update does ----------------------------


def test_diagnostics_after_a_restore_into_another_damping(problem, tmp_path):
  params, batches, grad_fn = problem
  old = afo.adafisher(1e-3, damping=1e-3, t_cov=1)
  _, state = _loop(old, params, batches[:2], grad_fn, [True, True])
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'ckpt', {'opt_state': state})
    checkpointer.wait_until_finished()
  new = afo.adafisher(1e-3, damping=0.5, t_cov=1)
  restored = afo.checkpoint.restore(
    tmp_path / 'ckpt', {'opt_state': new.init(params)}
  )['opt_state']
  report = afo.diagnostics(restored, params)
  factors = afo.adafisher_state(restored).factors['head']
  k = np.outer(factors.h[:-1], factors.s)
  assert report.layers['head'].f_min == pytest.approx(
    min(k.min(), (factors.h[-1] * factors.s).min()) + 0.5, rel=1e-5
  )


@pytest.mark.parametrize('top', ['opt_state', None])
def test_restore_of_injected_relative_damping(problem, tmp_path, top):
  """An injected ``relative_damping`` is a hyperparameter, not the 0.2
  layout's state field: the checkpoint restores bit for bit."""
  params, batches, grad_fn = problem
  tx = optax.inject_hyperparams(afo.adafisherw, static_args=('t_cov',))(
    1e-3, relative_damping=0.1, grafting='adam'
  )
  _, state = _loop(tx, params, batches[:3], grad_fn, [True] * 3)
  saved = state if top is None else {top: state}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'ckpt', saved)
    checkpointer.wait_until_finished()
  target = tx.init(params)
  restored = afo.checkpoint.restore(
    tmp_path / 'ckpt', target if top is None else {top: target}
  )
  chex.assert_trees_all_equal(restored, saved)


def _boxed_trees(kind):
  """``(model state, optimizer state)`` makers of boxed params: NNX
  Variables or linen ``nn.Partitioned``."""
  x = jnp.ones((4, 5))
  if kind == 'nnx':

    def make(seed):
      net = nnx.Linear(5, 3, rngs=nnx.Rngs(seed))
      opt = nnx.Optimizer(net, afo.adafisher_like_adam(1e-3), wrt=nnx.Param)
      return {'model': nnx.state(net), 'opt': nnx.state(opt)}

    return make
  dense = nn.Dense(
    3,
    kernel_init=nn.with_partitioning(
      nn.initializers.lecun_normal(), (None, 'mlp')
    ),
  )

  def make(seed):
    params = dense.init(jax.random.key(seed), x)['params']
    tx = afo.adafisher_like_adam(1e-3)
    return {'params': params, 'opt_state': tx.init(params)}

  return make


@pytest.mark.parametrize('kind', ['nnx', 'partitioned'])
def test_restore_of_boxed_params(tmp_path, kind):
  """Checkpoints of ``nnx.state(...)`` and of ``nn.Partitioned`` params
  (stored by orbax with their ``value`` entries) restore."""
  make = _boxed_trees(kind)
  saved = make(0)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'ckpt', saved)
    checkpointer.wait_until_finished()
  restored = afo.checkpoint.restore(tmp_path / 'ckpt', make(1))
  chex.assert_trees_all_equal(
    jax.tree.leaves(afo._tree.unbox_tree(restored)),
    jax.tree.leaves(afo._tree.unbox_tree(saved)),
  )


def test_restore_into_another_grafting_names_it(problem, tmp_path):
  params, _, _ = problem
  saved = {'opt_state': afo.adafisher_like_adam(1e-3).init(params)}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'ckpt', saved)
    checkpointer.wait_until_finished()
  target = {'opt_state': afo.adafisherw(1e-3).init(params)}
  with pytest.raises(ValueError, match=r"nu/.*grafting='adam'"):
    afo.checkpoint.restore(tmp_path / 'ckpt', target)


def test_restore_of_a_replicated_state_into_one_replica_says_so(
  problem, tmp_path
):
  params, _, _ = problem
  tx = afo.adafisher(1e-3)
  state = tx.init(params)
  replicated = jax.tree.map(lambda v: jnp.stack([v, v]), state)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'ckpt', {'opt_state': replicated})
    checkpointer.wait_until_finished()
  with pytest.raises(ValueError, match='leading axis of devices'):
    afo.checkpoint.restore(tmp_path / 'ckpt', {'opt_state': state})


def test_diagnostics_under_inject_hyperparams(problem):
  params, batches, grad_fn = problem
  tx = optax.inject_hyperparams(afo.adafisher, static_args=('t_cov',))(
    learning_rate=1e-3, damping=1e-3, t_cov=1
  )
  _, state = _loop(tx, params, batches[:2], grad_fn, [True, True])
  before = afo.diagnostics(state, params).layers['head'].f_min
  state.hyperparams['damping'] = jnp.asarray(0.25)
  after = afo.diagnostics(state, params).layers['head'].f_min
  assert after - before == pytest.approx(0.25 - 1e-3, rel=1e-4)


def test_diagnostics_of_a_damping_the_state_does_not_record(problem):
  """A damping given as an array, or injected under another name: the report
  asks for it instead of showing NaN; given, it is the static one's."""
  params, batches, grad_fn = problem
  static = afo.adafisher(1e-3, damping=1e-2, t_cov=1)
  _, want = _loop(static, params, batches[:2], grad_fn, [True, True])
  as_array = afo.adafisher(1e-3, damping=jnp.asarray(1e-2), t_cov=1)
  _, state = _loop(as_array, params, batches[:2], grad_fn, [True, True])
  with pytest.raises(ValueError, match=r'damping=<its value>'):
    afo.diagnostics(state, params)
  assert str(afo.diagnostics(state, params, damping=1e-2)) == str(
    afo.diagnostics(want, params)
  )

  def factory(lr, damp):
    return afo.adafisher(lr, damping=damp, t_cov=1)

  renamed = optax.inject_hyperparams(factory)(lr=1e-3, damp=1e-2)
  _, state = _loop(renamed, params, batches[:2], grad_fn, [True, True])
  with pytest.raises(ValueError, match=r'damping=<its value>'):
    afo.diagnostics(state, params)


def test_diagnostics_read_the_injected_hyperparameters_around_adafisher(
  problem,
):
  """multi_transform with AdaFisher and another optimizer each injected:
  the report reads AdaFisher's damping, not the other's."""
  params, batches, grad_fn = problem
  labels = {k: 'fisher' if k == 'head' else 'adam' for k in params}
  tx = optax.multi_transform(
    {
      'fisher': optax.inject_hyperparams(afo.adafisher, static_args=('t_cov',))(
        learning_rate=1e-3, damping=0.25, t_cov=1
      ),
      'adam': optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
    },
    labels,
  )
  _, state = _loop(tx, params, batches[:2], grad_fn, [True, True])
  report = afo.diagnostics(state, params)
  assert sorted(report.layers) == ['head']
  assert report.layers['head'].f_min >= 0.25


def test_two_adafishers_in_one_state_are_named_with_the_fix(problem):
  params, _, _ = problem
  labels = {k: 'a' if k == 'head' else 'b' for k in params}
  tx = optax.multi_transform(
    {'a': afo.adafisher(1e-3), 'b': afo.adafisher(1e-2)}, labels
  )
  state = tx.init(params)
  with pytest.raises(
    ValueError, match=r'found 2 \(pass the part.*inner_states'
  ):
    afo.refresh_schedule(state)
  assert next(afo.refresh_schedule(state.inner_states['a'])) is True


def test_a_meta_gradient_through_refreshing_updates(problem):
  """jax.grad of the loss after unrolled updates with respect to the
  learning rate: the factors' refresh is taken as given (as if the user had
  stopped the curvature's gradient), not an error inside JAX."""
  params, batches, grad_fn = problem
  x, y = batches[0]

  def after_two_steps(learning_rate, stop):
    tx = afo.adafisher(learning_rate, t_cov=1)
    p, state = params, tx.init(params)
    for _ in range(2):
      _, grads, curvature = grad_fn(p, x, y)
      if stop:
        curvature = jax.lax.stop_gradient(curvature)
      updates, state = tx.update(grads, state, p, curvature=curvature)
      p = optax.apply_updates(p, updates)
    return grad_fn(p, x, y, capture=False)[0]

  got = jax.grad(after_two_steps)(1e-3, False)
  assert np.isfinite(got) and got < 0
  assert got == jax.grad(after_two_steps)(1e-3, True)


# --- hyperparameters -----------------------------------------------------------


@pytest.mark.parametrize('numerics', ['reference', 'paper'])
def test_relative_damping_zero_is_refused(numerics):
  with pytest.raises(ValueError, match=r'relative_damping must be positive'):
    afo.adafisher(1e-3, numerics=numerics, relative_damping=0.0)


def test_inject_hyperparams_without_static_t_cov_says_so(problem):
  params, batches, grad_fn = problem
  tx = optax.inject_hyperparams(afo.adafisher)(learning_rate=1e-3, t_cov=5)
  state = tx.init(params)
  _, grads, _ = grad_fn(params, *batches[0])
  with pytest.raises(TypeError, match=r"static_args=\('t_cov',\)"):
    jax.jit(tx.update)(grads, state, params)


def test_injected_damping_changes_the_next_update(problem):
  params, batches, grad_fn = problem
  tx = optax.inject_hyperparams(afo.adafisher, static_args=('t_cov',))(
    learning_rate=1.0, damping=1e-3, t_cov=1
  )
  _, state = _loop(tx, params, batches[:1], grad_fn, [True])
  _, grads, _ = grad_fn(params, *batches[1], capture=False)
  small, _ = tx.update(grads, state, params)
  state.hyperparams['damping'] = jnp.asarray(10.0)
  large, _ = tx.update(grads, state, params)
  ratio = optax.tree.norm(small) / optax.tree.norm(large)
  assert ratio > 50  # F~ ~ 10 instead of ~1e-3..1


def test_weight_decay_with_another_models_params_names_the_path(problem):
  params, batches, grad_fn = problem
  tx = afo.adafisherw(1e-3, weight_decay=0.1)
  state = tx.init(params)
  _, grads, _ = grad_fn(params, *batches[0])
  other = MLP(widths=(16, 9)).init(jax.random.key(1), batches[0][0])['params']
  with pytest.raises(ValueError, match=r"params 'dense1/bias' has shape"):
    tx.update(grads, state, other)


@pytest.mark.parametrize(
  'wrong, message',
  [
    (
      lambda p: {'params': p},
      r"params 'params/dense0/bias' is not in the state",
    ),
    (lambda p: {}, r"params has no 'dense0/bias', which the state holds"),
    (
      lambda p: {k: v for k, v in p.items() if k != 'dense1'},
      r"params has no 'dense1/bias'",
    ),
  ],
  ids=['variables', 'empty', 'partial'],
)
@pytest.mark.parametrize('grafting', [None, 'rms'])
def test_params_of_another_structure_are_refused_with_a_path(
  problem, wrong, message, grafting
):
  """The whole variables dict, or params missing layers, passed to update."""
  params, batches, grad_fn = problem
  tx = afo.adafisher(1e-3, grafting=grafting)
  state = tx.init(params)
  _, grads, _ = grad_fn(params, *batches[0])
  with pytest.raises(ValueError, match=message):
    tx.update(grads, state, wrong(params))


def test_curvature_layout_of_abstract_arguments():
  """A model state and a batch from ``jax.eval_shape`` (as large models
  size things) give the layout of the concrete ones."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      x = nn.Dense(6, name='hidden')(x)
      x = nn.BatchNorm(use_running_average=not train, name='bn')(x)
      return nn.Dense(3, name='head')(nn.relu(x))

  model = Model()
  x = jnp.ones((4, 5))
  y = jnp.zeros((4,), jnp.int32)
  variables = model.init(jax.random.key(0), x)

  def loss_fn(params, model_state, x, y, train=True):
    logits, new_state = model.apply(
      {'params': params, **model_state}, x, train=train, mutable=['batch_stats']
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new_state

  grad_fn = afo.value_and_grad_with_curvature(loss_fn, has_aux=True)
  state = {'batch_stats': variables['batch_stats']}
  want = afo.curvature_layout(grad_fn, variables['params'], state, x, y)
  abstract = jax.eval_shape(lambda: (variables['params'], state, x, y))
  got = afo.curvature_layout(grad_fn, *abstract, train=True)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), got) == jax.tree.map(
    lambda a: (a.shape, a.dtype), want
  )
