"""The benchmarks' losses and a jitted train step for any optimizer, with or
without capture."""

from __future__ import annotations

import jax
import optax

from benchmarks.optimizers import curvature_grad


def reconstruction(logits, x):
  """Per image: the sigmoid cross-entropy of the pixels of ``x`` (in [0, 1])
  summed over them."""
  target = x.reshape(x.shape[0], -1)
  return optax.sigmoid_binary_cross_entropy(logits, target).sum(-1)


def model_loss(model, output: str = 'softmax', on_output=None):
  """``loss(params, model_state, x, y) -> (loss, new_model_state)``.

  ``output='softmax'``: the mean cross-entropy over every label (``y``
  holds integer labels shaped like the logits without their last axis:
  ``[B]`` for a classifier, ``[B, T]`` for a sequence model);
  ``'sigmoid'``: the mean over images of :func:`reconstruction` (``y``
  unused). ``on_output(output, target)``, if given, is called inside the
  loss (e.g. to register it with kfac-jax).
  """

  def loss(params, model_state, x, y):
    variables = {'params': params, **model_state}
    if model_state:
      out, new_state = model.apply(
        variables, x, train=True, mutable=list(model_state)
      )
    else:
      out, new_state = model.apply(variables, x), model_state
    if output == 'sigmoid':
      if on_output is not None:
        on_output(out, x.reshape(x.shape[0], -1))
      return reconstruction(out, x).mean(), new_state
    if on_output is not None:
      on_output(out, y)
    ce = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    return ce, new_state

  return loss


def cross_entropy_loss(model, on_logits=None):
  """:func:`model_loss` of a classifier (or sequence model)."""
  return model_loss(model, 'softmax', on_logits)


def make_train_step(model, tx, *, adafisher: bool, layers=None, donate=True):
  """Returns ``step(params, model_state, opt_state, x, y, refresh=True)``.

  With ``adafisher=True`` the steps with ``refresh`` (static) capture the
  curvature statistics and ``tx.update`` receives them, the others are plain
  steps (see :func:`adafisher_optax.refresh_schedule`); otherwise a plain
  ``jax.value_and_grad`` step.
  """
  loss = cross_entropy_loss(model)
  if adafisher:
    grad_fn = curvature_grad(loss, has_aux=True, layers=layers)
  else:
    plain = jax.value_and_grad(loss, has_aux=True)

    def grad_fn(*args, capture):
      del capture
      return (*plain(*args), None)

  def step(params, model_state, opt_state, x, y, refresh=True):
    (value, model_state), grads, curvature = grad_fn(
      params, model_state, x, y, capture=refresh
    )
    updates, opt_state = tx.update(
      grads, opt_state, params, curvature=curvature
    )
    return optax.apply_updates(params, updates), model_state, opt_state, value

  return jax.jit(
    step,
    donate_argnums=(0, 1, 2) if donate else (),
    static_argnames='refresh',
  )


def init_model(model, x, seed=0):
  """Returns ``(params, model_state)`` (model_state: e.g. batch_stats)."""
  variables = model.init(jax.random.key(seed), x)
  params = (
    variables.pop('params')
    if isinstance(variables, dict)
    else (variables['params'])
  )
  model_state = {k: v for k, v in variables.items() if k != 'params'}
  return params, model_state


def evaluate(model, params, model_state, x, y, batch_size=1000):
  """Accuracy and mean loss of ``model`` in eval mode, per label.

  For a sequence model (labels ``[N, T]``) both are per token.
  """

  @jax.jit
  def scores(xb, yb):
    logits = model.apply({'params': params, **model_state}, xb, train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
    return (logits.argmax(-1) == yb).sum(), ce.sum()

  correct = total_loss = 0.0
  for i in range(0, len(x), batch_size):
    hits, losses = scores(x[i : i + batch_size], y[i : i + batch_size])
    correct += float(hits)
    total_loss += float(losses)
  labels = y.size
  return correct / labels, total_loss / labels
