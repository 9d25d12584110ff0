"""Embedding models: a BERT encoder in MLX (`bert`) and `EmbeddingEngine` (`engine`)."""
