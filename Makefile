# iosea-wf: one entry point for installing, bringing the local site up, testing and the demo.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
SITE ?= inventories/local
ROLES_WITH_MOLECULE := $(patsubst roles/%/molecule/default/molecule.yml,%,$(wildcard roles/*/molecule/default/molecule.yml))

.PHONY: help install lint unit test test-site molecule site site-down demo bench clean

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
	@# Byte-compile the package as a wheel install would: where PYTHONDONTWRITEBYTECODE is set,
	@# every command would otherwise compile each module it imports (~70 ms per iosea-wf-mover).
	@$(BIN)/python -m compileall -q iosea_wf

lint: install  ## ruff, yamllint and ansible-lint
	$(BIN)/ruff check iosea_wf tests bench roles
	$(BIN)/ruff format --check iosea_wf tests bench roles
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint -q playbooks roles

unit: install  ## the tests that need neither Slurm nor NFS
	$(BIN)/pytest -q -m 'not site' tests

site: install  ## install and start the local site (munge, Slurm, nfs-ganesha) from inventories/local
	$(BIN)/ansible-playbook -i $(SITE) playbooks/site.yml

site-down: install  ## stop every daemon of the local site
	$(BIN)/ansible-playbook -i $(SITE) playbooks/site.yml -e site_action=stop

molecule: install  ## every role's Molecule scenario
	@for role in $(ROLES_WITH_MOLECULE); do \
	  echo "== molecule test: $$role"; \
	  (cd roles/$$role && ANSIBLE_ROLES_PATH=$(abspath roles) $(BIN)/molecule test) || exit 1; \
	done

test: install lint site molecule  ## lint, bring the local site up, run the whole suite
	@# Coverage is of the test processes only (the in-process CLI calls most tests make); the
	@# iosea-wf processes some tests spawn, and Slurm jobs, are not measured.
	IOSEA_WF_REQUIRE_SITE=1 $(BIN)/pytest -q --cov=iosea_wf --cov-report=term tests

demo: install site  ## bring the local site up and run the example workflow end to end
	bash examples/demo.sh

bench: install site  ## every benchmark under bench/
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .coverage build iosea_wf.egg-info
	find iosea_wf tests bench -name __pycache__ -prune -exec rm -rf {} +
