"""Exports to formats other tools run: GGUF for llama.cpp and Ollama (gguf.py), with llama.cpp's own scripts
and binaries from the pinned sdist (llama_cpp.py) and its tokenizer checked against the model's (tokens.py).
Dagster-free."""
