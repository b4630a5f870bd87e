#!/usr/bin/env bash
# Bootstrap a fresh GPU instance for the DeepSeek-OCR PDF pipeline. Idempotent: every step checks
# whether it is already done, so re-running it (by hand or through SSM) is safe.
#
#   1. checks the NVIDIA driver (nvidia-smi answers, at least one GPU)
#   2. creates a virtualenv and installs this project with the [vllm,aws] extras
#   3. pre-fetches the model to local disk (workers then run with HF_HUB_OFFLINE=1)
#   4. creates the worker log folder used by aws/launch_ssm.py
#
# Usage (from the project checkout, as root or a user that can write the paths below):
#   sudo bash aws/setup_multi_gpu_env.sh
# Settings (environment variables, all optional):
#   PROJECT_DIR  checkout to install          (default: the folder above this script)
#   VENV_DIR     virtualenv location          (default: $PROJECT_DIR/.venv)
#   PYTHON       interpreter for the venv     (default: python3, must be >= 3.10)
#   EXTRAS       pip extras                   (default: vllm,aws)
#   MODEL_ID     Hugging Face model id        (default: deepseek-ai/DeepSeek-OCR)
#   MODEL_DIR    local model folder           (default: /opt/models/<last part of MODEL_ID>)
#   SKIP_MODEL=1 do not download the model;  SKIP_GPU_CHECK=1 allow a machine without GPUs (CI)
# Credentials: none are read or printed here. A gated model needs HF_TOKEN in the environment;
# huggingface_hub reads it itself and this script never echoes it.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROJECT_DIR="${PROJECT_DIR:-$(cd "${SCRIPT_DIR}/.." && pwd)}"
VENV_DIR="${VENV_DIR:-${PROJECT_DIR}/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-vllm,aws}"
MODEL_ID="${MODEL_ID:-deepseek-ai/DeepSeek-OCR}"
MODEL_DIR="${MODEL_DIR:-/opt/models/${MODEL_ID##*/}}"
LOG_ROOT="${LOG_ROOT:-/var/log/deepseek-ocr}"

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

check_driver() {
  if [ "${SKIP_GPU_CHECK:-0}" = "1" ]; then
    log "GPU check skipped (SKIP_GPU_CHECK=1)"
    return 0
  fi
  command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: install the NVIDIA driver (or use a Deep Learning AMI)"
  local gpus driver
  gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
  [ "${gpus}" -ge 1 ] || die "nvidia-smi lists no GPU (driver not loaded?)"
  driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
  log "driver ${driver:-unknown}, ${gpus} GPU(s)"
}

check_python() {
  command -v "${PYTHON}" >/dev/null 2>&1 || die "${PYTHON} not found"
  "${PYTHON}" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "${PYTHON} is older than 3.10"
}

make_venv() {
  if [ -x "${VENV_DIR}/bin/python" ]; then
    log "virtualenv ${VENV_DIR} exists"
  else
    log "creating virtualenv ${VENV_DIR}"
    "${PYTHON}" -m venv "${VENV_DIR}"
  fi
  "${VENV_DIR}/bin/python" -m pip install --quiet --upgrade pip
}

install_project() {
  local stamp="${VENV_DIR}/.installed-${EXTRAS//,/-}"
  local current
  current="$(cd "${PROJECT_DIR}" && sha1sum pyproject.toml | cut -d' ' -f1)"
  if [ -f "${stamp}" ] && [ "$(cat "${stamp}")" = "${current}" ]; then
    log "project already installed with [${EXTRAS}] (pyproject.toml unchanged)"
    return 0
  fi
  log "installing ${PROJECT_DIR}[${EXTRAS}]"
  "${VENV_DIR}/bin/python" -m pip install --quiet -e "${PROJECT_DIR}[${EXTRAS}]"
  printf '%s\n' "${current}" > "${stamp}"
}

fetch_model() {
  if [ "${SKIP_MODEL:-0}" = "1" ]; then
    log "model download skipped (SKIP_MODEL=1)"
    return 0
  fi
  if [ -f "${MODEL_DIR}/.complete" ]; then
    log "model ${MODEL_ID} already in ${MODEL_DIR}"
    return 0
  fi
  mkdir -p "${MODEL_DIR}"
  log "downloading ${MODEL_ID} to ${MODEL_DIR}"
  if [ -x "${VENV_DIR}/bin/hf" ]; then
    "${VENV_DIR}/bin/hf" download "${MODEL_ID}" --local-dir "${MODEL_DIR}"
  elif [ -x "${VENV_DIR}/bin/huggingface-cli" ]; then
    "${VENV_DIR}/bin/huggingface-cli" download "${MODEL_ID}" --local-dir "${MODEL_DIR}"
  else
    "${VENV_DIR}/bin/python" - "${MODEL_ID}" "${MODEL_DIR}" <<'PY'
import sys
from huggingface_hub import snapshot_download
snapshot_download(repo_id=sys.argv[1], local_dir=sys.argv[2])
PY
  fi
  [ -f "${MODEL_DIR}/config.json" ] || die "download finished but ${MODEL_DIR}/config.json is missing"
  touch "${MODEL_DIR}/.complete"
}

verify() {
  (cd "${PROJECT_DIR}" && "${VENV_DIR}/bin/python" -c 'import runner.cli, runner.storage_s3; print("runner OK")')
  if [ "${SKIP_GPU_CHECK:-0}" != "1" ]; then
    "${VENV_DIR}/bin/python" -c 'import torch, vllm; print("vllm", vllm.__version__, "cuda", torch.cuda.is_available(), torch.cuda.device_count(), "GPU(s)")'
  fi
}

main() {
  check_driver
  check_python
  make_venv
  install_project
  fetch_model
  mkdir -p "${LOG_ROOT}"
  verify
  log "ready. Workers: cd ${PROJECT_DIR} && HF_HUB_OFFLINE=1 ${VENV_DIR}/bin/python -m runner --model ${MODEL_DIR} ..."
}

main "$@"
