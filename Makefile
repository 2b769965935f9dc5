# foldserve: `make serve` (train -> fold -> verify -> serve) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REPO ?= model_repository
MODEL ?= digits_resnet

.PHONY: install lint test test-hardening test-docker image serve model bench docs clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[train,test]'
	touch $(STAMP)

# ruff (pycodestyle, pyflakes, isort, bugbear, pyupgrade, simplify) and mypy (strict on foldserve/ and server/core/)
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy foldserve server folding trainer cli bench

test: install
	$(BIN)/python -m pytest -q tests

# The full hardening run: 10,000+ fuzz cases across both transports, 60 s at twice capacity.
test-hardening: install
	FOLDSERVE_HARDENING_FULL=1 $(BIN)/python -m pytest -q -s -m hardening tests/hardening

IMAGE ?= foldserve-server:latest

# The CPU server image where no registry is reachable: a base made locally (debootstrap) and a wheelhouse (needs a
# running container engine; `make test-docker` starts one as root).
image: install
	bash docker/build-image.sh $(IMAGE)

# Builds the CPU server image (docker/build-image.sh, as `make image`) and runs it (needs a container engine or root).
test-docker: install
	bash docker/test-docker.sh

# docs/configuration.md from server/settings.py (tests/test_docs.py fails when they differ)
docs: install
	$(BIN)/python -c "from cli.serve import configuration_markdown; print(configuration_markdown(), end='')" \
		> docs/configuration.md

bench: install
	$(BIN)/foldserve bench

# Builds the default model repository entry if it is missing (train on digits -> fold -> verify).
model: install
	test -f $(REPO)/$(MODEL)/config.pbtxt || $(BIN)/foldserve pipeline --repository $(REPO) --name $(MODEL)

serve: model
	@echo "serving $(REPO) on gRPC :8001 and HTTP :8000 (Ctrl-C stops). Try, in another shell:"
	@echo "  curl localhost:8000/v2/models/$(MODEL)"
	@echo "  $(BIN)/foldserve infer --url localhost:8001 --model $(MODEL) some_digits.npy"
	$(BIN)/foldserve serve --repository $(REPO)

clean:
	rm -rf $(VENV) runs $(REPO) .pytest_cache
