"""The README's runnable examples run and do what they say."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).parents[1] / 'examples'


def _load(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_pure_jax_example_learns():
  assert _load('pure_jax').main(['--steps', '80']) > 0.6


def test_data_parallel_example_matches_one_device():
  assert _load('data_parallel').main(['--steps', '2']) < 1e-5
