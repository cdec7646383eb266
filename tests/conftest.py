import os
import sys
from pathlib import Path

# Eight virtual CPU devices for the multi-device tests; set before JAX starts.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax
import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def x64():
  """Runs the test with ``jax_enable_x64`` (exact float64 comparisons)."""
  with jax.enable_x64(True):
    yield
