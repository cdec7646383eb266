"""One process of the multi-host test: ``python multihost_worker.py ID N PORT OUT``.

Each process has 2 virtual CPU devices; JAX's distributed runtime joins them
over localhost with gloo collectives into one 4-device mesh. The processes
train a data-parallel model with sharded ``jit`` for a few steps, each
feeding its own half of every global batch, and process 0 saves the params.
"""

import os
import re
import sys

# Two devices per process; the other flags as the test process compiles.
os.environ['XLA_FLAGS'] = (
  re.sub(
    r'--xla_force_host_platform_device_count=\d+',
    '',
    os.environ.get('XLA_FLAGS', ''),
  )
  + ' --xla_force_host_platform_device_count=2'
)

import jax
import numpy as np

import multihost_problem


def main():
  process_id, processes, port, out = sys.argv[1:5]
  jax.config.update('jax_enable_x64', True)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    f'localhost:{port}',
    num_processes=int(processes),
    process_id=int(process_id),
    initialization_timeout=120,
  )
  params = multihost_problem.train_sharded()
  if jax.process_index() == 0:
    flat = {
      jax.tree_util.keystr(k): np.asarray(v.addressable_data(0))
      for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
    np.savez(out, **flat)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
