"""The evidence protocol, declared before the runs: tasks, arms, grids,
seeds, margins, the rules that choose and the rules that judge.

``python -m benchmarks.evidence --protocol-only`` writes it as Markdown
(:func:`text`); the results embed the same text. Nothing here runs a model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from benchmarks import optimizers as opt
from benchmarks import tasks
from benchmarks.optimizers import Arm

GRID_COUNT, GRID_FACTOR, MAX_EXTENSIONS = 5, 2.0, 4
DECAY_FACTOR = 10.0  # the decay grid: centre / 10, centre, centre * 10
TIME_TOLERANCE = 0.05  # equal time = equal steps inside [1/1.05, 1.05]
SENSITIVITY = 0.01  # learning rates within 1% of an arm's best
BATCH_SIZES = (32, 512)  # and the task's own (128): the batch-size study
BATCH_TASK = 'autoencoder'
TIMING_ROUNDS, TIMING_STEPS = 20, 10

# ------------------------------------------------------------------- arms

ADAM = opt.ADAM
ADAMW = opt.arm(
  'adamw',
  'AdamW (decoupled decay, tuned)',
  'optax',
  optimizer='adamw',
  weight_decay=0.1,
)
SGDM = opt.arm(
  'sgdm',
  'SGD momentum 0.9 (L2 decay, tuned)',
  'optax',
  optimizer='sgd',
  momentum=0.9,
  weight_decay=5e-4,
)
MUON = opt.arm(
  'muon',
  'Muon (optax.contrib, consistent_rms 0.2; AdamW for the rest)',
  'optax',
  optimizer='muon',
  consistent_rms=0.2,
)
ADAFACTOR = opt.arm(
  'adafactor',
  'Adafactor (optax, momentum 0.9, every matrix factored)',
  'optax',
  optimizer='adafactor',
  momentum=0.9,
  min_dim_size_to_factor=1,
)
DEFAULT = opt.arm(
  'adafisher', "AdaFisher, authors' constants (reference)", 'adafisher'
)
ADAFISHERW = opt.arm(
  'adafisherw',
  "AdaFisherW, authors' constants (decay tuned)",
  'adafisher',
  alias='adafisherw',
  weight_decay=0.1,
)
RELATIVE = {
  a: opt.arm(
    f'adafisher-rel-{a:g}',
    f'AdaFisher paper numerics, relative damping {a:g}',
    'adafisher',
    numerics='paper',
    relative_damping=a,
  )
  for a in (1.0, 0.1)
}
# The drop-in candidates (Adam's learning rate, no decay, as Adam).
LIKE_ADAM = opt.arm(
  'graft-adam-rel0.1',
  "AdaFisherW grafting='adam', relative damping 0.1 (adafisher_like_adam)",
  'adafisher',
  alias='adafisherw',
  grafting='adam',
  relative_damping=0.1,
  weight_decay=0.0,
)
GRAFT_RMS = opt.arm(
  'graft-rms',
  "AdaFisherW grafting='rms' (reference numerics)",
  'adafisher',
  alias='adafisherw',
  grafting='rms',
  weight_decay=0.0,
)
GRAFT_POWER = opt.arm(
  'graft-adam-rel0.1-p0.5',
  "AdaFisherW grafting='adam', relative damping 0.1, fisher_power 0.5",
  'adafisher',
  alias='adafisherw',
  grafting='adam',
  relative_damping=0.1,
  fisher_power=0.5,
  weight_decay=0.0,
)
KFAC = opt.KFAC

PEERS = (ADAM, ADAMW, SGDM, MUON, ADAFACTOR)
ADAFISHERS = (DEFAULT, ADAFISHERW, *RELATIVE.values())
CANDIDATES = (LIKE_ADAM, GRAFT_RMS, GRAFT_POWER)
PRIMARY = PEERS + ADAFISHERS + CANDIDATES
DECAYED = (ADAMW, SGDM, ADAFISHERW)


def arms_by_name() -> dict[str, Arm]:
  every = [*PRIMARY, KFAC, *(opt.permuted(c) for c in CANDIDATES)]
  return {a.name: a for a in every}


# ------------------------------------------------------------------ tasks


@dataclasses.dataclass(frozen=True)
class TaskProtocol:
  config: Any
  centers: dict[str, float]  # learning-rate grid centre per arm
  curve_points: int
  kfac: bool = False
  arms: tuple[str, ...] | None = None  # None: every primary arm
  timing_rounds: int = TIMING_ROUNDS
  timing_steps: int = TIMING_STEPS


@dataclasses.dataclass(frozen=True)
class Tier:
  tasks: dict[str, TaskProtocol]
  tune_seeds: tuple[int, ...]
  eval_seeds: tuple[int, ...]
  grid_count: int = GRID_COUNT
  max_extensions: int = MAX_EXTENSIONS
  batch_sizes: tuple[int, ...] = BATCH_SIZES
  batch_task: str | None = BATCH_TASK
  replicate: int = 2  # arms whose evaluation is replicated in a new process


def _centers(adam, sgd, adafisher, relative, adafactor=1e-2):
  """Grid centres: Adam-like arms at ``adam``, SGD at ``sgd``, the authors'
  AdaFisher at ``adafisher``, relative damping ``{a: lr}``."""
  adam_like = ('adam', 'adamw', 'muon', *(c.name for c in CANDIDATES))
  centers = {name: adam for name in adam_like}
  centers.update(
    sgdm=sgd,
    adafactor=adafactor,
    adafisher=adafisher,
    adafisherw=adafisher,
    **{RELATIVE[a].name: lr for a, lr in relative.items()},
  )
  return centers


# Grid centres, from the pilots (benchmarks/results/evidence/pilot.md: one
# pilot seed, a quarter of the horizon, 4x apart; a best value at the top
# of the pilot moves the centre up); the GPT's from the Adam horizon pilot
# and the first study's tuned rates (no sweep: its AdaFisher arms waited
# for the tied embedding's capture).
CNN_CENTERS = _centers(8e-3, 0.1, 2e-3, {1.0: 1.0, 0.1: 0.5}, adafactor=0.04)
AE_CENTERS = _centers(0.01, 0.1, 4e-3, {1.0: 4.0, 0.1: 2.0}, adafactor=0.08)
GPT_CENTERS = _centers(8e-3, 0.3, 4e-3, {1.0: 6.0, 0.1: 4.0}, adafactor=0.02)
MLP_CENTERS = _centers(2e-3, 0.05, 5e-4, {1.0: 0.5, 0.1: 0.25})

CNN = tasks.CnnConfig(
  stages=(8, 16, 32), pool=2, batch_size=64, epochs=6, train_limit=10_000
)
AUTOENCODER = tasks.AutoencoderConfig(
  widths=(256, 128, 64, 16),
  pool=2,
  batch_size=128,
  epochs=16,
  train_limit=20_000,
)
GPT = tasks.ShakespeareConfig(
  layers=2, d_model=64, heads=4, seq_len=64, batch_size=8, steps=1500
)

QUICK_MLP = tasks.FashionConfig(
  widths=(32,),
  batch_size=64,
  epochs=1,
  validation_size=1000,
  train_limit=2048,
  test_limit=1000,
  eval_batch=1000,
)
QUICK_ARMS = (
  'adam',
  'sgdm',
  'adafactor',
  'adafisher',
  LIKE_ADAM.name,
  GRAFT_RMS.name,
)
GPU_CNN = tasks.CnnConfig(
  stages=(32, 64, 128), pool=1, batch_size=128, epochs=3, eval_batch=5_000
)
GPU_ARMS = ('adam', 'sgdm', 'adafisher', LIKE_ADAM.name, GRAFT_RMS.name)
MARGINS = {'cnn': 0.003, 'autoencoder': 0.5, 'gpt': 0.01, 'mlp': 0.003}

PROTOCOL = {
  'full': Tier(
    tasks={
      'cnn': TaskProtocol(CNN, CNN_CENTERS, curve_points=6),
      'autoencoder': TaskProtocol(
        AUTOENCODER, AE_CENTERS, curve_points=6, kfac=True
      ),
      'gpt': TaskProtocol(GPT, GPT_CENTERS, curve_points=6),
    },
    tune_seeds=(0, 1),
    eval_seeds=tuple(range(100, 106)),
  ),
  # CI: every kind of arm and every step of the protocol, tiny.
  'quick': Tier(
    tasks={
      'mlp': TaskProtocol(
        QUICK_MLP,
        MLP_CENTERS,
        curve_points=3,
        arms=QUICK_ARMS,
        timing_rounds=3,
        timing_steps=3,
      ),
    },
    tune_seeds=(0,),
    eval_seeds=(100, 101, 102),
    grid_count=3,
    max_extensions=1,
    batch_sizes=(32,),
    batch_task='mlp',
    replicate=2,
  ),
  # GPU tier (benchmarks.gpu_tier): the CNN at 28x28, three stages, all of
  # the training images; the arms a GPU session of minutes allows.
  'gpu': Tier(
    tasks={
      'cnn': TaskProtocol(
        GPU_CNN,
        CNN_CENTERS,
        curve_points=5,
        arms=GPU_ARMS,
        timing_rounds=10,
      ),
    },
    tune_seeds=(0, 1),
    eval_seeds=tuple(range(100, 106)),
    grid_count=4,
    max_extensions=1,
    batch_task=None,
    replicate=1,
  ),
  'gpu-tiny': Tier(
    tasks={
      'cnn': TaskProtocol(
        tasks.CnnConfig(
          stages=(4, 8),
          pool=2,
          batch_size=16,
          epochs=1,
          validation_size=128,
          train_limit=128,
          test_limit=128,
          eval_batch=128,
        ),
        CNN_CENTERS,
        curve_points=2,
        arms=('adam', 'sgdm'),
        timing_rounds=2,
        timing_steps=2,
      ),
    },
    tune_seeds=(0,),
    eval_seeds=(100, 101),
    grid_count=2,
    max_extensions=0,
    batch_task=None,
    replicate=0,
  ),
  # The unit tests' end-to-end run: smaller still.
  'smoke': Tier(
    tasks={
      'mlp': TaskProtocol(
        dataclasses.replace(QUICK_MLP, widths=(8,), train_limit=512),
        MLP_CENTERS,
        curve_points=2,
        arms=('adam', 'sgdm', LIKE_ADAM.name),
        timing_rounds=2,
        timing_steps=2,
      ),
    },
    tune_seeds=(0,),
    eval_seeds=(100, 101),
    grid_count=2,
    max_extensions=1,
    batch_sizes=(32,),
    batch_task='mlp',
    replicate=1,
  ),
}

# ------------------------------------------------------------------ rules

SELECTION_RULE = (
  'Recommended drop-in configuration (declared before the runs): among the '
  'candidates ' + ', '.join(f'`{c.name}`' for c in CANDIDATES) + ', the '
  'one with the smallest mean over tasks of its normalised tuning deficit '
  "to Adam, d = (Adam's score - its score) / margin for accuracy and (its "
  "score - Adam's) / margin for a loss, each score the mean validation "
  "metric over the tuning seeds at the arm's own best learning rate; a "
  'candidate that does not train on some task is out; ties (within 0.1) go '
  'to the earlier in that list. Computed over the tasks that have tuning '
  'results (all three once the GPT has run); the evaluation seeds play no '
  'part.'
)
VERDICT_RULE = (
  'Verdict of a paired comparison (arm - reference, evaluation seeds): '
  '**better** / **worse** when the Holm-adjusted p < 0.05 and the whole '
  '95% CI lies beyond +margin / -margin (in the better / worse direction); '
  '**equivalent** when the whole 95% CI lies within +-margin; otherwise '
  '**inconclusive**. A verdict stands when both replications give it.'
)


def text(tier_name: str) -> str:
  """The protocol as Markdown."""
  tier = PROTOCOL[tier_name]
  lines = [f'## Protocol ({tier_name} tier; fixed before the runs)', '']
  lines += ['* Tasks (each runnable alone: `--task NAME`):']
  for name, proto in tier.tasks.items():
    arms = proto.arms or tuple(a.name for a in PRIMARY)
    centers = ', '.join(f'{a} {proto.centers[a]:g}' for a in arms)
    lines += [
      f'  * `{name}`: {dataclasses.asdict(proto.config)}; margin '
      f'{MARGINS[name]:g}; a validation point every 1/{proto.curve_points} '
      'of the horizon',
      f'    * arms and learning-rate grid centres: {centers}'
      + ('; kfac-jax (adaptive, not tuned)' if proto.kfac else ''),
    ]
  lines += _split_lines() + _tuning_lines(tier) + _report_lines(tier)
  return '\n'.join(lines)


def _split_lines() -> list[str]:
  return [
    '* Horizons and grid centres: from the pilots (`pilot.md`, pilot seed '
    "1000): Adam's validation metric from the horizon to twice it: CNN "
    '+0.1 accuracy point (flat), autoencoder -2.0 nats/image after a '
    'plateau (3%), GPT -0.145 nats/char (not flat: a 1500-step budget).',
    '* Budget: about 5 hours of this 2-core machine in all, single-run '
    'steps measured at 19.5 ms (CNN), 6 ms (autoencoder) and 20 ms (GPT) '
    'on a loaded machine: CNN about 1.7 h, autoencoder with kfac-jax and the '
    'batch-size study about 1.5 h, GPT about 2 h, for some 300 runs per '
    'task (13-15 arms x (2 tuning seeds x 5+ rates + decay stage + 6 '
    'evaluation seeds + equal-time runs)); the sizes, subsets and horizons '
    'above are what fits.',
    '* Data: Fashion-MNIST: the 60,000 training images split once by '
    '`default_rng(12345).permutation`: 5,000 validation, the next '
    '`train_limit` for training; the 10,000 test images scored once, at the '
    'end. Shakespeare: contiguous blocks, 90% train / 5% validation / 5% '
    'test, SHA-256 recorded.',
    '* Schedule, every arm: linear warmup over 5% of its steps, then cosine '
    'to zero at its own horizon (kfac-jax adapts its own learning rate).',
  ]


def _tuning_lines(tier: Tier) -> list[str]:
  decayed = ', '.join(
    f'`{a.name}` centre {a.kwargs["weight_decay"]:g}' for a in DECAYED
  )
  return [
    f'* Learning rates: {tier.grid_count} values {GRID_FACTOR:g}x apart '
    "around the arm's centre, on the tuning seeds "
    f'{list(tier.tune_seeds)}; while the best value is at an end of those '
    f'tried, the next value {GRID_FACTOR:g}x beyond it is added (at most '
    f'{tier.max_extensions} times). Best: the best mean final validation '
    'metric over the tuning seeds (accuracy; the loss for the autoencoder '
    'and the GPT); a value with a non-finite run is out; ties go low.',
    f'* Weight decay, the same way for every decayed arm ({decayed}): '
    'stage 1 tunes the learning rate at the centre decay; stage 2 tries '
    f'centre / {DECAY_FACTOR:g} and centre x {DECAY_FACTOR:g} at that '
    "learning rate; the best (learning rate, decay) pair is the arm's. "
    'AdamW and AdaFisherW decay decoupled (multiplied by the learning '
    'rate), SGD couples it (L2 in the gradient).',
    '* Arms: Adam; AdamW; SGD-momentum; Muon (`optax.contrib.muon`, '
    'consistent_rms 0.2 so that one learning rate serves its matrices and '
    'its AdamW, which gets the embeddings, the head, biases and norms); '
    'Adafactor (`optax.adafactor`, momentum 0.9 and every matrix factored, '
    "the control 'captured statistics vs the gradient's own factored second "
    "moment'); AdaFisher with the authors' constants (reference numerics, "
    't_cov 100, damping 1e-3, gamma 0.8); AdaFisherW with tuned decay; '
    'AdaFisher paper numerics with relative damping 1 and 0.1 (the better '
    'one on the tuning seeds is "best relative damping"); the drop-in '
    "candidates (AdaFisherW at Adam's learning-rate scale, no decay): "
    + ', '.join(f'`{c.name}`' for c in CANDIDATES)
    + ' (fisher_power 0.5 is the third); the control: the factors permuted '
    "within each layer, for the task's best candidate on the tuning seeds "
    '(tuned like every arm); kfac-jax on the autoencoder in its recommended '
    'configuration (adaptive learning rate, momentum and damping, initial '
    'damping 1, L2 1e-3), not tuned.',
    '* ' + SELECTION_RULE,
  ]


def _report_lines(tier: Tier) -> list[str]:
  return [
    f'* Seeds: tune on {list(tier.tune_seeds)}; report on '
    f'{list(tier.eval_seeds)}, paired (a seed fixes the initialisation and '
    'the batch order for every arm and learning rate). Every run trains '
    'alone in the same compiled program of its arm, so a run gives the same '
    'bits in any process.',
    '* Replication: the evaluation runs of '
    f'{tier.replicate} arms per task (Adam and the best candidate) are run '
    'again in a fresh process; their final parameters are compared bit for '
    'bit (SHA-256 fingerprints). Equal bits show the runs deterministic, '
    'and then the second replication of every arm is the first.',
    '* Report: final test metric per arm (mean, std over the evaluation '
    'seeds); paired differences against Adam and against the best peer '
    '(the best of Adam, AdamW, SGD-m, Muon, Adafactor on the tuning seeds), '
    "t-based 95% CIs, Holm over each table's comparisons; the controls "
    '(best candidate vs its permuted factors, vs Adafactor) with their own '
    'Holm.',
    '* ' + VERDICT_RULE,
    '* Equal time: step-time ratios to Adam from interleaved rounds '
    f'({TIMING_ROUNDS} rounds of {TIMING_STEPS} steps in the full tier, one '
    'run, the same batch, this machine), as the geometric mean of the '
    'per-round ratios with a 95% CI. An arm whose ratio CI lies inside '
    f'[1/{1 + TIME_TOLERANCE:g}, {1 + TIME_TOLERANCE:g}] costs the same: '
    'equal time is equal steps. One whose CI lies wholly outside gets '
    'round(N / ratio) steps (its own schedule) on the evaluation seeds. One '
    'whose CI straddles a bound: its equal-time verdict is "inconclusive '
    '(timing)".',
    f'* Learning-rate sensitivity: per arm, the range of learning rates '
    f'whose mean tuning score is within {SENSITIVITY:.0%} of its best '
    '(relative), from the tuning runs; one plot per task.',
    f'* Batch size: on `{tier.batch_task}`, Adam and the recommended '
    f'candidate at batch {", ".join(str(b) for b in tier.batch_sizes)} '
    "besides the task's own, at the same epochs, each batch size's learning "
    "rate tuned on a grid centred at the task's choice x sqrt(B / B0), "
    'reported on the evaluation seeds.',
  ]


def relative_damping_best(entry: dict, better) -> str | None:
  """The name of the better relative damping arm (tuning seeds)."""
  names = [a.name for a in RELATIVE.values() if a.name in entry['arms']]
  scored = [(entry['arms'][n]['grid']['score'], n) for n in names]
  best = None
  for score, name in scored:
    if best is None or better(score, best[0]):
      best = (score, name)
  return None if best is None else best[1]


def deficit(score: float, adam: float, margin: float, higher: bool) -> float:
  """The normalised tuning deficit to Adam (positive: worse than Adam)."""
  if not (math.isfinite(score) and math.isfinite(adam)):
    return math.inf
  return ((adam - score) if higher else (score - adam)) / margin
