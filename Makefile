# dicom-importer — the two commands a new user needs: `make run` and `make test`.
# Each installs what it needs: Debian packages via apt-get when missing, Python deps in .venv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_DELAY ?= 5

.PHONY: test run bench chaos lint system-deps venv clean docker-image docker-test

## Debian packages: DCMTK (the DICOM tools), Orthanc (demo PACS and test receiver), venv,
## gcc (the campaign's and the tests' clock shim, chaos/clockjump.c).
system-deps:
	@missing=""; \
	command -v storescu >/dev/null 2>&1 || missing="$$missing dcmtk"; \
	command -v gcc >/dev/null 2>&1 || missing="$$missing gcc libc6-dev"; \
	[ -x /usr/sbin/Orthanc ] || command -v Orthanc >/dev/null 2>&1 || missing="$$missing orthanc"; \
	$(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

## Lint, then the whole suite (unit + integration against real DCMTK and real receivers).
test: system-deps venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .

## Demo: Orthanc on 127.0.0.1 (DICOM 4242, HTTP 8042) and the importer on ./var/import.
run: system-deps venv
	$(BIN)/python -m simsite.demo --delay $(DEMO_DELAY)

## Benchmark: legacy scripts vs raw-tools floor vs importer, same corpus, same receiver;
## then the outage case (a backlog while the PACS is down, drained when it answers).
bench: system-deps venv
	$(BIN)/python bench/bench.py $(BENCH_ARGS)
	$(BIN)/python bench/outage.py $(OUTAGE_ARGS)

## Fault campaign: seeded random scenarios, checked by the oracle (chaos/). SEED=n replays
## one; RUNS=n (from FIRST=1) runs that many; MINUTES=m stops starting new ones after m.
chaos: system-deps venv
	@command -v strace >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends strace; }
	$(BIN)/python -m chaos $(if $(SEED),--seed $(SEED),--runs $(or $(RUNS),20) \
	  --first-seed $(or $(FIRST),1)) $(if $(MINUTES),--minutes $(MINUTES)) $(CHAOS_ARGS)

## The container image (needs a Docker engine; see docker/Dockerfile for offline builds).
docker-image:
	docker build -f docker/Dockerfile -t dicom-importer .

## Only the image smoke tests (they start their own dockerd; part of `make test` too).
docker-test: system-deps venv
	$(BIN)/python -m pytest -q tests/test_docker.py

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache *.egg-info
