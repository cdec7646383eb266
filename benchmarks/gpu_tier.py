"""GPU tier of the evidence benchmark: the CNN task at a larger size.

    python -m benchmarks.gpu_tier            # one GPU session (minutes)
    python -m benchmarks.gpu_tier --tiny     # a CPU check of the logic

The ResNet-style CNN with BatchNorm at 28x28 (three stages 32-64-128) on
all 55,000 training images, under the evidence protocol
(:mod:`benchmarks.protocol`, tier ``gpu``: Adam, SGD-momentum, AdaFisher
with the authors' constants and two drop-in candidates; fewer seeds and a
shorter grid than the CPU tier, to fit a session), written to
``benchmarks/results/evidence_gpu`` with the device named in every JSON.
"""

from __future__ import annotations

from benchmarks import cli, evidence


def main(argv=None):
  parser = cli.parser(__doc__.splitlines()[0], cli.RESULTS / 'evidence_gpu')
  parser.add_argument('--tiny', action='store_true', help='a CPU logic check')
  parser.add_argument('--resume', action='store_true')
  args = parser.parse_args(argv)
  tier = 'gpu-tiny' if args.tiny else 'gpu'
  base = ['--tier', tier, '--out-dir', str(args.out_dir)]
  evidence.main(base + ['--task', 'cnn'] + ['--resume'] * args.resume)
  return evidence.main(base + ['--report'])


if __name__ == '__main__':
  main()
