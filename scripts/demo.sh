#!/usr/bin/env bash
# The offline demo (`make demo`): 2 TAPIR rounds on 48 bundled Alpaca instructions, end to end,
# with a local teacher/judge, ending with the report table (`tapir-ray doctor` tells what the
# machine can run; the run checks its config itself). An interrupted demo resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
T="$VENV/bin/tapir-ray"
RUN=runs/demo
if [ -f "$RUN/state.json" ] && ! grep -q '"status": "done"' "$RUN/state.json"; then
  echo "resuming the interrupted demo in $RUN"
  exec "$T" run jobs/demo_cpu.yaml --resume
fi
rm -rf "$RUN"
started=$(date +%s)
"$T" run jobs/demo_cpu.yaml
echo "demo finished in $(( $(date +%s) - started )) s; report: $RUN/metrics/report.md"
