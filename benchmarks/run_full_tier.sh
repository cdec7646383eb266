#!/usr/bin/env bash
# The full CPU tier of the evidence benchmark, one task after the other (so
# they do not fight for the cores), resumable: rerun this script after an
# interruption and every task goes on from its JSON. Logs: <task>.log in
# the repository root; results: benchmarks/results/evidence/.
#
#   benchmarks/run_full_tier.sh                 # CNN, autoencoder, batch size
#   benchmarks/run_full_tier.sh gpt             # the char GPT, then the report
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1
run() {  # run NAME TASKS: one process per task group, appended to NAME.log
  echo "=== $(date -u +%FT%TZ) start $2" >> "$1.log"
  $python -m benchmarks.evidence --task "$2" --resume >> "$1.log" 2>&1
  echo "=== $(date -u +%FT%TZ) end $2 (exit $?)" >> "$1.log"
}
if [ "${1:-}" = gpt ]; then
  run gpt gpt
else
  run cnn cnn
  run autoencoder autoencoder,batch
fi
$python -m benchmarks.evidence --report >> report.log 2>&1
