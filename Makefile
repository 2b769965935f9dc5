# foldserve: `make serve` (train -> fold -> verify -> serve) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REPO ?= model_repository
MODEL ?= digits_resnet

.PHONY: install test serve model clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

# Builds the default model repository entry if it is missing (train on digits -> fold -> verify).
model: install
	test -f $(REPO)/$(MODEL)/config.pbtxt || $(BIN)/foldserve pipeline --repository $(REPO) --name $(MODEL)

serve: model
	$(BIN)/foldserve serve --repository $(REPO)

clean:
	rm -rf $(VENV) runs $(REPO) .pytest_cache
