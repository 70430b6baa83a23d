# The README's two commands. Both create .venv when missing and install the project first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test install clean-demo

$(STAMP): pyproject.toml constraints.txt packages/minibooru/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision first, then everything else under the same pins (timm would swap torch otherwise)
	$(BIN)/python -m pip install -q -r constraints.txt
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,dask]'
	# the mini-booru (demo + tests: a generated Danbooru with a local server); not part of the product
	$(BIN)/python -m pip install -q -c constraints.txt -e packages/minibooru
	touch $(STAMP)

install: $(STAMP)

# The tests also run the Ray task runner on a local Ray cluster; the demo does not need Ray.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,dask,ray]'
	touch $(TEST_STAMP)

demo: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/fm run -c demo
	@echo "Inspect a stage: $(BIN)/fm inspect train    Sample: $(BIN)/fm sample current \"1girl, solo, masterpiece\" --width 256 --height 256"

# One xdist worker per core (at most 4), whole files per worker (module fixtures built once): 12:45 instead of
# 19:33 on 2 cores. (Handing the longest files out first was slower: 17:46 in a fresh clone.)
test: $(TEST_STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

clean-demo:
	rm -rf .data/demo
