#!/usr/bin/env bash
# The test command (README, .ci/run): set up a fresh machine, then run the whole suite against real mosquitto
# brokers that the tests start themselves on free ports. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check coordinator edge_node shared broker_config tests benchmarks scripts
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
