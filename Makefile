# Names the project's commands; scripts/setup.sh and pyproject.toml hold the details.
PY := .venv/bin/python
BUF := node_modules/.bin/buf

.PHONY: setup gen lint typecheck check-gen proto-baseline test bench demo ci
.NOTPARALLEL:

setup:
	bash scripts/setup.sh

gen:
	$(PY) scripts/gen_protos.py
	node clients/node/scripts/gen.mjs

# ruff (with the SLF and os.environ rules), the import contracts of ARCHITECTURE.md, and the protos:
# buf lint, buf format, and buf breaking against protos/baseline.binpb (the last accepted API).
lint:
	.venv/bin/ruff check .
	.venv/bin/lint-imports --no-cache .importlinter tests/.importlinter
	.venv/bin/ruff format --check .
	$(BUF) lint
	$(BUF) format -d --exit-code
	$(BUF) breaking --against protos/baseline.binpb

# After a breaking proto change has been accepted (deliberately, in review): rebuild the baseline
# that `make lint` compares against, and commit it with the change.
proto-baseline:
	$(BUF) build --exclude-source-info -o protos/baseline.binpb

typecheck:
	.venv/bin/mypy sdk/runplane sdk/runplane_core services

check-gen:
	$(PY) scripts/gen_protos.py --check
	node clients/node/scripts/gen.mjs --check

# Runs the PostgreSQL variants too (tests marked `postgres`); with CI set they fail, not skip,
# when PostgreSQL is unreachable. Three workers for most tests (they mostly wait on services);
# the fault tests (kill -9, restarts, a latency gate) run alone afterwards.
test: setup lint typecheck check-gen
	$(PY) -m pytest -ra -n 3 --ignore=tests/faults
	$(PY) -m pytest -ra tests/faults

bench:
	$(PY) bench/run.py

demo: setup
	.venv/bin/runplane dev --tasks examples.hello --trigger hello-world --payload '{"name": "world"}' --exit

ci: test
