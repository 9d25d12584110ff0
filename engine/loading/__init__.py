"""Getting a model into memory: source strings, the GGUF export, mlx_lm's load, and the CPU's fast
path (float32 weights over a preloaded OpenBLAS)."""
