"""The paged KV cache: a block pool and its bookkeeping, the prefix index, the cache objects mlx_lm's
models talk to, decode working copies, and the manager that admits requests by the blocks they use."""
