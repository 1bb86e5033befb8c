"""Exports to formats other tools run: GGUF for llama.cpp and Ollama (gguf.py). Dagster-free."""
