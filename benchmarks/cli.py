"""What every benchmark writes about its run: the machine, the command, the date.

Shared by :mod:`benchmarks.evidence`, :mod:`benchmarks.step_cost` and
:mod:`benchmarks.communication` so that their outputs describe the machine
the same way.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / 'results'


def positive_int(text: str) -> int:
  """An ``argparse`` type: an integer of at least 1."""
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
  return value


def names_from(choices: Any):
  """An ``argparse`` type: a comma-separated list of names of ``choices``."""

  def parse(text: str) -> list[str]:
    names = text.split(',')
    unknown = [n for n in names if n not in choices]
    if unknown:
      raise argparse.ArgumentTypeError(
        f'unknown {unknown}; choose from {", ".join(choices)}'
      )
    return names

  return parse


def machine_info() -> dict[str, Any]:
  """The backend, device, CPUs and library versions of this process."""
  import jax

  device = jax.devices()[0]
  versions = {}
  for module in ('jax', 'jaxlib', 'flax', 'optax', 'kfac_jax'):
    try:
      versions[module] = __import__(module).__version__
    except Exception:
      versions[module] = None
  usable = (
    len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
  )
  return {
    'jax_backend': jax.default_backend(),
    'device_kind': device.device_kind,
    'device_count': jax.device_count(),
    'cpu_count': os.cpu_count(),
    'cpus_usable': usable,
    'processor': platform.processor() or platform.machine(),
    'python': platform.python_version(),
    'versions': versions,
  }


def machine_line(info: dict[str, Any] | None = None) -> str:
  """One line: ``cpu: cpu, x86_64, 2 CPUs, jax 0.10.2`` (the step-cost form)."""
  info = info or machine_info()
  return (
    f'{info["jax_backend"]}: {info["device_kind"]}, {info["processor"]}, '
    f'{info["cpu_count"]} CPUs, jax {info["versions"]["jax"]}'
  )


def git_commit() -> str | None:
  """The repository's ``HEAD`` commit (``+dirty`` with uncommitted changes
  to tracked files), ``None`` outside a git checkout."""
  import subprocess

  root = Path(__file__).resolve().parents[1]
  try:
    head = subprocess.run(
      ['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True
    )
    dirty = subprocess.run(
      ['git', 'status', '--porcelain', '--untracked-files=no'],
      cwd=root,
      capture_output=True,
      text=True,
    )
  except OSError:
    return None
  if head.returncode != 0:
    return None
  return head.stdout.strip() + ('+dirty' if dirty.stdout.strip() else '')


def source_id(commit: str) -> str | None:
  """What decides a run's bits at ``commit``: the git blob ids of the
  library and of the benchmark code (results excluded), as one string;
  ``None`` outside a git checkout or for an unknown commit."""
  import subprocess

  root = Path(__file__).resolve().parents[1]
  listing = subprocess.run(
    ['git', 'ls-tree', '-r', commit, '--', 'adafisher_optax', 'benchmarks'],
    cwd=root,
    capture_output=True,
    text=True,
  )
  if listing.returncode != 0:
    return None
  lines = listing.stdout.splitlines()
  return '\n'.join(x for x in lines if '\tbenchmarks/results/' not in x)


def command(module: str, argv: list[str] | None) -> str:
  """The command line that reproduces this run."""
  args = sys.argv[1:] if argv is None else argv
  return f'python -m {module} {shlex.join(args)}'.strip()


def utc_now() -> str:
  return datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')


def parser(
  description: str, out_dir: Path = RESULTS
) -> argparse.ArgumentParser:
  """An argument parser with the options every benchmark shares."""
  result = argparse.ArgumentParser(
    description=description,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  result.add_argument(
    '--out-dir',
    type=Path,
    default=out_dir,
    help=f'where the results go (default: {out_dir})',
  )
  return result
