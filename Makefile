# Two commands on a fresh machine with Python >= 3.10 and pip:
#   make test   installs everything into .venv and runs the tests and every chapter (quick mode)
#   make book   installs everything into .venv and builds the executed HTML book in _build/html
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.covidseg-installed
# The chapters of _toc.yml, in order (the root page first); the course page is text, not a notebook.
CHAPTERS := $(filter-out book/course.md,$(shell sed -n 's/^root: *\(.*\)/\1.md/p; s/^ *- file: *\(.*\)/\1.md/p' _toc.yml))
NOTEBOOK_DIR ?= $(or $(TMPDIR),/tmp)/covidseg-nbval
CELL_TIMEOUT ?= 1800
# The chapters' training runs, shared by make test and make book. A finished run is reused only
# while its config and the package's code are unchanged (covidseg.notebook.train_or_reuse).
RUNS_DIR ?= $(CURDIR)/book/runs

.PHONY: install test test-unit test-notebooks record-outputs book sync-notebooks clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[book,test]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

test: test-unit test-notebooks

test-unit: install
	$(BIN)/python -m pytest tests

# Each chapter runs as Colab runs it: converted alone to .ipynb in an empty folder, quick preset.
# Cells tagged nbval-check-output are compared with the outputs recorded in book/expected_outputs.
test-notebooks: install
	rm -rf $(NOTEBOOK_DIR) && mkdir -p $(NOTEBOOK_DIR)
	$(BIN)/python tests/nbval_prepare.py $(NOTEBOOK_DIR) $(CHAPTERS)
	cd $(NOTEBOOK_DIR) && COVIDSEG_QUICK=1 COVIDSEG_RUNS=$(RUNS_DIR) MPLBACKEND=Agg $(abspath $(BIN))/python -m pytest -p no:cacheprovider \
		--nbval-lax --nbval-cell-timeout=$(CELL_TIMEOUT) -o addopts="" -o testpaths="" -v --durations=0 \
		$(notdir $(CHAPTERS:.md=.ipynb))

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
	rm -rf _build $(NOTEBOOK_DIR)
