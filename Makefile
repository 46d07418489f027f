# Set-up is idempotent: each environment is rebuilt only when its inputs change.
PYTHON ?= python3.11
VENV := .venv
TRITON_VENV := .venv-triton
BIN := $(VENV)/bin
DEMO_DIR ?= work/demo

.PHONY: setup demo test browser clean

setup: $(VENV)/.installed $(TRITON_VENV)/.installed

# The application environment: torch 2.14.1 / torchvision 0.29.1 come from this
# machine's wheel cache (the pins in pyproject.toml), everything else from PyPI.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Triton's python backend runs models in its own interpreter, which needs numpy<2;
# it gets this small environment (the pip Triton server binary comes with nvidia-pytriton).
$(TRITON_VENV)/.installed: requirements-triton.txt
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install --quiet -r requirements-triton.txt
	touch $@

# Debian's Chromium for the demo's browser test (Playwright drives it; it never downloads one).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

demo: setup
	$(BIN)/histoseek quickstart --workdir $(DEMO_DIR) $(DEMO_ARGS)

test: setup browser
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(TRITON_VENV) work runs model_repository/*/
