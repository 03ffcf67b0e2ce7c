#!/usr/bin/env bash
# The documented run behind pyproject.toml's lower bounds: a fresh venv with every core dependency at its
# floor (torch: the CPU build this project is tested with), then the suite without the slow learning tests.
# Usage: bash tools/lower_bounds.sh   (about 10 minutes on 2 cores; needs the package index)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
pip install -q torch==2.13.0
# The Stable Diffusion stack at its floors; the small utilities (numpy, Pillow, tqdm, click, matplotlib) as
# pip resolves them beside those.
pip install -q "diffusers==0.42.0" "transformers==5.24.0" "accelerate==1.0.0" "safetensors==0.8.0" \
    "huggingface_hub==1.32.0" numpy pillow tqdm click matplotlib "pytest>=8.0" "hypothesis>=6.100"
pip install -q --no-deps -e .
pip list 2>/dev/null | grep -iE "^(torch|diffusers|transformers|tokenizers|accelerate|safetensors|huggingface.hub|numpy|pillow|tqdm|click|matplotlib) "
HF_HUB_OFFLINE=1 python -m pytest -q -m "not slow" -p no:cacheprovider --ignore=tests/test_ui.py --ignore=tests/test_ui_unit.py
