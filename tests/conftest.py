import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def x64():
  """Runs the test with ``jax_enable_x64`` (exact float64 comparisons)."""
  with jax.enable_x64(True):
    yield
