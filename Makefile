# The two commands the README starts with.
TEXT ?= examples/lighthouse.txt
QUESTION ?= Who kept the lighthouse lamp burning during the storm?

.PHONY: setup dev trace test lint bench-trace

setup:
	bash scripts/setup.sh

dev:
	bash scripts/setup.sh --dev

trace: setup
	.venv/bin/flowsieve trace --model smollm2 --text-file $(TEXT) --question "$(QUESTION)" \
		--json out/trace.json --html out/trace.html

test: dev
	.venv/bin/ruff check src tests benchmarks scripts
	.venv/bin/lint-imports
	bash scripts/lint_assets.sh
	OMP_NUM_THREADS=2 .venv/bin/python -m pytest -q

lint: dev
	.venv/bin/ruff check src tests benchmarks scripts
	.venv/bin/ruff format --check src tests benchmarks scripts
	.venv/bin/lint-imports
	bash scripts/lint_assets.sh

bench-trace: setup
	.venv/bin/python benchmarks/trace_overhead.py --tokens 4096
