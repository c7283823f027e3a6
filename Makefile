# Every target does its own set-up: a fresh machine needs nothing but python3 and npm.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NPM_STAMP := convex/node_modules/.installed

.PHONY: install demo test lint typecheck pytest convex-test convex-deploy convex-migrate bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(NPM_STAMP): convex/package.json convex/package-lock.json
	cd convex && npm ci --no-audit --no-fund --loglevel=error
	touch $(NPM_STAMP)

install: $(STAMP) $(NPM_STAMP)

demo: $(STAMP)
	$(BIN)/python -m examples.demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy src tests examples benchmarks

# The dashboard's browser test drives Debian's chromium (through Playwright, a dev extra):
# installed here when missing, as `bench` installs wrk.
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	apt-get update -qq && apt-get install -y -qq chromium \
		|| { echo "install chromium (apt-get install chromium) for the dashboard's browser test"; exit 2; }

# The pytest suite starts the loopback Convex test server, which needs convex/node_modules.
# Branch coverage of src/convex_guard is checked against fail_under in pyproject.toml.
pytest: $(STAMP) $(NPM_STAMP) $(CHROMIUM)
	$(BIN)/pytest -q --cov --cov-report=term

convex-test: $(NPM_STAMP)
	cd convex && npm test && npm run typecheck

# The checks that need no server run side by side, while chromium installs if missing; then the
# suite, which has the machine to itself (some of its tests compare latencies).
test:
	$(MAKE) --no-print-directory --output-sync=target -j4 lint typecheck convex-test $(CHROMIUM)
	$(MAKE) --no-print-directory pytest

# Deploy convex/ to the self-hosted backend named by CONVEX_SELF_HOSTED_URL (see README).
convex-deploy: $(NPM_STAMP)
	@test -n "$$CONVEX_SELF_HOSTED_URL" || { echo "set CONVEX_SELF_HOSTED_URL"; exit 2; }
	@test -n "$$CONVEX_SELF_HOSTED_ADMIN_KEY" || { echo "set CONVEX_SELF_HOSTED_ADMIN_KEY"; exit 2; }
	cd convex && npx convex deploy --yes

# Run the data migrations the deployed functions define and the deployment has not finished,
# and wait until they are done (see README, "Upgrading"). Needs only node: the script calls
# migrations:run and migrations:status over the backend's HTTP API with the admin key.
# MIGRATE_ARGS='{"dryRun": true}' tries the first pending batch and commits nothing.
convex-migrate:
	@test -n "$$CONVEX_SELF_HOSTED_URL" || { echo "set CONVEX_SELF_HOSTED_URL"; exit 2; }
	@test -n "$$CONVEX_SELF_HOSTED_ADMIN_KEY" || { echo "set CONVEX_SELF_HOSTED_ADMIN_KEY"; exit 2; }
	cd convex && node scripts/migrate.mjs '$(MIGRATE_ARGS)'

# Benchmarks need wrk and valgrind (Debian's packages) for the HTTP tables; installed here when
# missing.
bench: $(STAMP) $(NPM_STAMP)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; } \
		|| { echo "install wrk (apt-get install wrk) for the HTTP benchmark"; exit 2; }
	@command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; } \
		|| { echo "install valgrind (apt-get install valgrind) for the instructions benchmark"; exit 2; }
	$(BIN)/python -m benchmarks

# The regression check to run before pushing: in-process callgrind only (guard and floor, under a
# minute), printing both instruction counts per request and their ratio.
bench-quick: $(STAMP)
	@command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; } \
		|| { echo "install valgrind (apt-get install valgrind) for the instructions benchmark"; exit 2; }
	$(BIN)/python -m benchmarks.instructions --quick

clean:
	rm -rf $(VENV) convex/node_modules .pytest_cache .mypy_cache .ruff_cache
