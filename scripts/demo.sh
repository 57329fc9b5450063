#!/usr/bin/env bash
# The offline demo (`make demo`). Until the TAPIR main job lands, it checks the machine and ingests
# the demo pool: the first stage of the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
T="$VENV/bin/tapir-ray"
"$T" config validate jobs/demo_cpu.yaml
"$T" doctor --config jobs/demo_cpu.yaml --no-endpoints
"$T" ingest bundled:alpaca-5k --config jobs/demo_cpu.yaml --out runs/demo/ingest
echo
echo "The multi-round TAPIR job (tapir-ray run jobs/demo_cpu.yaml) is not in this version yet:"
echo "this demo ran the stages that exist (config, doctor, ingest)."
