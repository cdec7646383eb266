import os
import sys
from pathlib import Path

# Set before JAX starts: eight virtual CPU devices for the multi-device tests,
# and LLVM's cheapest code generation. The tests check values, not speed, and
# XLA:CPU compile time is most of their time (about half of it goes at the
# default optimisation level); XLA's own HLO passes (fusion, layout) still run.
os.environ.setdefault(
  'XLA_FLAGS',
  '--xla_force_host_platform_device_count=8'
  ' --xla_backend_optimization_level=0'
  ' --xla_llvm_disable_expensive_passes=true',
)

import jax
import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def x64():
  """Runs the test with ``jax_enable_x64`` (exact float64 comparisons)."""
  with jax.enable_x64(True):
    yield
