# Two commands on a fresh machine with Python 3.11 and pip (Linux x86-64, the platform of the lock):
#   make test   installs the locked environment into .venv and runs the tests and every chapter (quick mode)
#   make book   installs the locked environment into .venv and builds the executed HTML book in _build/html
# Others: make lock (regenerate the lock from pyproject.toml), make test-latest (the newest versions
# that pyproject.toml allows, in .venv-latest: upstream drift shows up there first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.covidseg-installed
# The exact versions and hashes of everything make test and make book install (uv pip compile).
LOCK := requirements/lock.txt
LOCK_CONSTRAINTS := requirements/constraints.txt
UV_VERSION := 0.13.9
LATEST_VENV ?= .venv-latest
# The chapters of _toc.yml, in order (the root page first); the course page is text, not a notebook.
CHAPTERS := $(filter-out book/course.md,$(shell sed -n 's/^root: *\(.*\)/\1.md/p; s/^ *- file: *\(.*\)/\1.md/p' _toc.yml))
NOTEBOOK_DIR ?= $(or $(TMPDIR),/tmp)/covidseg-nbval
# Cells are bounded one by one (book/_ext/cell_timeouts.py): a few minutes, longer for cells
# tagged "training". The same module bounds them under nbval here and in jupyter-book.
CELL_TIMEOUTS := $(CURDIR)/book/_ext
# The chapters' training runs, shared by make test and make book. A finished run is reused only
# while its config and the package's code are unchanged (covidseg.notebook.train_or_reuse).
RUNS_DIR ?= $(CURDIR)/book/runs

.PHONY: install lock test test-unit test-notebooks test-latest record-outputs book sync-notebooks clean

install: $(STAMP)

# The locked packages (hash-checked, no resolution), then covidseg itself, built with the locked
# setuptools. COVIDSEG_LOCKED=1 tells tests/test_environment.py to compare the two.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# Regenerate the lock from pyproject.toml's ranges and the constraints (run after changing either).
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet "uv==$(UV_VERSION)"
	.venv-lock/bin/uv pip compile pyproject.toml --extra book --extra test --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --constraint $(LOCK_CONSTRAINTS) \
		--quiet -o $(LOCK)

test: test-unit test-notebooks

test-unit: install
	COVIDSEG_LOCKED=1 $(BIN)/python -m pytest tests

# Each chapter runs as Colab runs it: converted alone to .ipynb in an empty folder, quick preset.
# Cells tagged nbval-check-output are compared with the outputs recorded in book/expected_outputs.
test-notebooks: install
	rm -rf $(NOTEBOOK_DIR) && mkdir -p $(NOTEBOOK_DIR)
	$(BIN)/python tests/nbval_prepare.py $(NOTEBOOK_DIR) $(CHAPTERS)
	cd $(NOTEBOOK_DIR) && COVIDSEG_QUICK=1 COVIDSEG_RUNS=$(RUNS_DIR) MPLBACKEND=Agg PYTHONPATH=$(CELL_TIMEOUTS) \
		$(abspath $(BIN))/python -m pytest -p no:cacheprovider -p cell_timeouts \
		--nbval-lax -o addopts="" -o testpaths="" -v --durations=0 \
		$(notdir $(CHAPTERS:.md=.ipynb))

# The unit tests and one chapter on the newest versions pyproject.toml allows (not the lock), in a
# separate venv; not part of make test or CI.
test-latest:
	rm -rf $(LATEST_VENV) $(NOTEBOOK_DIR)-latest && mkdir -p $(NOTEBOOK_DIR)-latest
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[book,test]"
	$(LATEST_VENV)/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	$(LATEST_VENV)/bin/python -m pip list --format=freeze > $(NOTEBOOK_DIR)-latest/versions.txt
	$(LATEST_VENV)/bin/python -m pytest tests
	$(LATEST_VENV)/bin/python tests/nbval_prepare.py $(NOTEBOOK_DIR)-latest book/03_preprocessing.md
	cd $(NOTEBOOK_DIR)-latest && COVIDSEG_QUICK=1 MPLBACKEND=Agg PYTHONPATH=$(CELL_TIMEOUTS) \
		$(abspath $(LATEST_VENV))/bin/python -m pytest -p no:cacheprovider -p cell_timeouts \
		--nbval-lax -o addopts="" -o testpaths="" -v 03_preprocessing.ipynb

# Re-record the expected outputs of the cells tagged nbval-check-output (after changing such a cell on purpose).
record-outputs: install
	rm -rf $(NOTEBOOK_DIR) && mkdir -p $(NOTEBOOK_DIR)
	COVIDSEG_QUICK=1 MPLBACKEND=Agg $(BIN)/python tests/nbval_prepare.py --record $(NOTEBOOK_DIR) $(CHAPTERS)

book: install
	COVIDSEG_RUNS=$(RUNS_DIR) $(BIN)/jupyter-book build --warningiserror --keep-going --path-output . .

# Regenerate the output-free .ipynb twins (the Colab buttons open them) from the MyST sources.
sync-notebooks: install
	$(BIN)/jupytext --sync $(CHAPTERS)

clean:
	rm -rf _build $(NOTEBOOK_DIR) $(NOTEBOOK_DIR)-latest
