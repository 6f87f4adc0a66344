#!/usr/bin/env bash
# The main job (README): set up a fresh machine, then run a local FedSpine fleet (embedded broker, coordinator,
# simulated Jetson nodes on the pretrained MiniLM and the labelled tweets). Extra arguments go to `fedspine simulate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/fedspine simulate "$@"
