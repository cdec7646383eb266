"""Two processes on localhost (gloo CPU collectives) = one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

import multihost_problem

HERE = Path(__file__).parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  out = tmp_path / 'params.npz'
  port = _free_port()
  env = {
    'PYTHONPATH': f'{HERE}:{HERE.parent}',
    'PATH': '/usr/bin:/bin',
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),  # as this process compiles
  }
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        str(HERE / 'multihost_worker.py'),
        str(i),
        '2',
        str(port),
        str(out),
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    logs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert all(p.returncode == 0 for p in procs), '\n'.join(logs)
  with jax.enable_x64(True):
    want = multihost_problem.train_single()
  got = np.load(out)
  for path, value in jax.tree_util.tree_leaves_with_path(want):
    value = np.asarray(value)
    err = np.max(np.abs(got[jax.tree_util.keystr(path)] - value))
    assert err <= 1e-9 * np.max(np.abs(value)), (path, err)
