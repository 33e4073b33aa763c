"""Serving a bank: the engine (model + tokenizer + retriever + memory store), retrieval, text
generation and the honest evaluation of memory (`m3 eval`)."""
