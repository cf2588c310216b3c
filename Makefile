# Two commands for a newcomer: `make run` and `make test`.
# Everything Python lives in .venv at the repo root.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
MOUNT   ?= ./deploy
STATE   ?= ./.deployfs
# More options for `deployfs serve`: make run ARGS="--metrics 127.0.0.1:9464 --9p tcp!127.0.0.1!5640"
ARGS    ?=

.PHONY: run test fuzz bench demo cluster sysdeps clean

sysdeps:
	@scripts/ensure-system-deps

$(STAMP): pyproject.toml
	@scripts/ensure-system-deps
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	@# A dead mount left by a killed server fails even `mkdir -p` (ENOTCONN): deployfs
	@# serve cleans it up itself, so only a missing directory is made here.
	@mkdir -p $(MOUNT) 2>/dev/null || true  # the state directory deployfs makes itself, owner-only
	$(VENV)/bin/deployfs serve $(MOUNT) --state $(STATE) $(ARGS)

test: export DEPLOYFS_TEST_DEPS=1
test: $(STAMP)
	@DEPLOYFS_TEST_DEPS=1 scripts/ensure-system-deps
	$(PY) -m mypy
	$(PY) -m pytest

# Random exploration of the property tests (the planner, the parser): more examples than
# `make test`, a fresh seed each run.  FUZZ_EXAMPLES=N to go further (default 2000).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q --timeout 0 tests/control/test_properties.py tests/model/test_manifest.py

# A local 3-node cluster on a 3-member etcd: mounts ./cluster/n1..n3/mnt (docs/cluster.md).
cluster: $(STAMP)
	@DEPLOYFS_CLUSTER_DEPS=1 scripts/ensure-system-deps
	$(PY) scripts/cluster.py

demo: $(STAMP)
	$(PY) scripts/demo.py

bench: export DEPLOYFS_TEST_DEPS=1
bench: $(STAMP)
	@DEPLOYFS_TEST_DEPS=1 scripts/ensure-system-deps
	@for b in fs ninep supervise rollout router peers store cluster; do echo; $(PY) bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .hypothesis
