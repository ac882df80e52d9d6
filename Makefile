# iosea-wf: one entry point for installing, bringing the local site up, testing and the demo.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
SITE ?= inventories/local
ROLES_WITH_MOLECULE := $(patsubst roles/%/molecule/default/molecule.yml,%,$(wildcard roles/*/molecule/default/molecule.yml))

.PHONY: help install wheel lint unit test test-site molecule site site-down demo bench clean \
  site-multihost site-multihost-down test-multihost molecule-multihost wheelhouse

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed  ## create .venv with iosea-wf (editable) and every dependency
	@# tests/integration/test_package.py makes a venv from Debian's python3, which needs python3-venv.
	@/usr/bin/python3 -c 'import ensurepip' 2>/dev/null || apt-get install -y -q python3-venv
	@# tests/integration/test_site_check_ssh.py runs an sshd of its own (apt's policy-rc.d starts none).
	@test -x /usr/sbin/sshd || DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server
	@# Byte-compile the package as a wheel install would: where PYTHONDONTWRITEBYTECODE is set,
	@# every command would otherwise compile each module it imports (~70 ms per iosea-wf-mover).
	@$(BIN)/python -m compileall -q iosea_wf

# The same sources give the same wheel, byte for byte (SOURCE_DATE_EPOCH): the site role reinstalls
# iosea-wf, and restarts the service, only when the code changed. Built from a copy, so that no
# build/ or egg-info of the checkout ever ships stale files.
WHEEL_DIR := build/wheel
wheel: install  ## build the iosea-wf wheel the site's Workflow Manager and users run (build/wheel)
	@rm -rf build/wheel-src $(WHEEL_DIR) && mkdir -p build/wheel-src
	@tar -c --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
	  --exclude=__pycache__ --exclude='./.*cache' --exclude=./.hypothesis --exclude='./.coverage*' --exclude=./.state --exclude=./.cache . \
	  | tar -x -C build/wheel-src
	@SOURCE_DATE_EPOCH=315532800 $(BIN)/pip wheel -q --no-deps --disable-pip-version-check \
	  -w $(WHEEL_DIR) build/wheel-src 2>&1 | grep -v '^WARNING: Location' || true
	@rm -rf build/wheel-src
	@ls $(WHEEL_DIR)/iosea_wf-*.whl

lint: install  ## ruff, yamllint and ansible-lint
	$(BIN)/ruff check iosea_wf tests bench roles tools
	$(BIN)/ruff format --check iosea_wf tests bench roles tools
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint -q playbooks roles

unit: install  ## the tests that need neither Slurm nor NFS
	$(BIN)/pytest -q -m 'not site' tests

site: wheel  ## install and start the local site (munge, Slurm, nfs-ganesha, the Workflow Manager service)
	$(BIN)/ansible-playbook -i $(SITE) playbooks/site.yml \
	  -e workflow_manager_wheel=$(abspath $(wildcard $(WHEEL_DIR)/iosea_wf-*.whl))

site-down: install  ## stop every daemon of the local site
	$(BIN)/ansible-playbook -i $(SITE) playbooks/site.yml -e site_action=stop

# The multi-host site: hosts built on this machine by tools/multihost/harness.py (namespaces, each
# with its own sshd), brought up over SSH by the same playbooks/site.yml. The local site stays up.
MULTIHOST := inventories/multihost
HARNESS := $(BIN)/python tools/multihost/harness.py
MULTIHOST_PLAYBOOK := $(BIN)/ansible-playbook -f 10 -i $(MULTIHOST) playbooks/site.yml

# The site's hosts reach no package index: iosea-wf's dependencies come from a wheelhouse built
# here (from pip's cache, after the first time), which they see as a software depot.
WHEELHOUSE := build/wheelhouse
MULTIHOST_VARS = -e workflow_manager_wheel=$(abspath $(wildcard $(WHEEL_DIR)/iosea_wf-*.whl)) \
  -e workflow_manager_pip_find_links=$(abspath $(WHEELHOUSE))

wheelhouse: wheel
	@# pip would take a wheelhouse's older iosea_wf wheel of the same name for the new one.
	@rm -f $(WHEELHOUSE)/iosea_wf-*.whl
	@$(BIN)/pip wheel -q --disable-pip-version-check -w $(WHEELHOUSE) $(WHEEL_DIR)/iosea_wf-*.whl 2>&1 \
	  | grep -v '^WARNING: Location' || true

site-multihost: wheelhouse  ## build the multi-host site's hosts and bring the site up on them over SSH
	$(HARNESS) up
	$(MULTIHOST_PLAYBOOK) $(MULTIHOST_VARS)

site-multihost-down: install  ## stop the multi-host site's daemons and take its hosts away
	@if $(HARNESS) status >/dev/null 2>&1; then $(MULTIHOST_PLAYBOOK) -e site_action=stop || true; fi
	$(HARNESS) down

molecule-multihost: wheelhouse  ## the whole-site Molecule scenario (molecule/): site.yml on the multi-host site
	$(HARNESS) up
	IOSEA_WF_WHEEL=$(abspath $(wildcard $(WHEEL_DIR)/iosea_wf-*.whl)) IOSEA_WF_WHEELHOUSE=$(abspath $(WHEELHOUSE)) \
	  ANSIBLE_ROLES_PATH=$(abspath roles) $(BIN)/molecule test -s default

# Brings the multi-host site up, runs its suite and its Molecule scenario, and takes it away
# (KEEP_MULTIHOST=1 leaves it up), keeping the tests' exit status.
test-multihost: site-multihost  ## bring the multi-host site up, run tests/multihost and molecule/, take it down
	@rc=0; IOSEA_WF_SITE=$(abspath $(MULTIHOST)) IOSEA_WF_REQUIRE_SITE=1 $(BIN)/pytest -q --durations=10 \
	  -p no:cacheprovider tests/multihost || rc=$$?; \
	[ $$rc = 0 ] && { $(MAKE) --no-print-directory molecule-multihost || rc=$$?; }; \
	[ -n "$(KEEP_MULTIHOST)" ] || $(MAKE) --no-print-directory site-multihost-down; exit $$rc

molecule: wheel  ## every role's Molecule scenario
	@export IOSEA_WF_WHEEL=$(abspath $(wildcard $(WHEEL_DIR)/iosea_wf-*.whl)); for role in $(ROLES_WITH_MOLECULE); do \
	  echo "== molecule test: $$role"; \
	  (cd roles/$$role && ANSIBLE_ROLES_PATH=$(abspath roles) $(BIN)/molecule test) || exit 1; \
	done

test: install lint site molecule  ## lint, bring the local site up, run the whole suite
	@# Coverage is of the test processes only (the in-process CLI calls most tests make); the
	@# iosea-wf processes some tests spawn, and Slurm jobs, are not measured. The 20 slowest tests
	@# are listed, to keep the whole target well under 20 minutes.
	IOSEA_WF_REQUIRE_SITE=1 $(BIN)/pytest -q --durations=20 --cov=iosea_wf --cov-report=term tests \
	  --ignore=tests/multihost

demo: install site  ## bring the local site up and run the example workflow end to end
	bash examples/demo.sh

bench: install site  ## every benchmark under bench/
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .coverage build iosea_wf.egg-info
	find iosea_wf tests bench -name __pycache__ -prune -exec rm -rf {} +
