"""The paged KV cache: its typed seam (`interface`), a block pool and its bookkeeping, the prefix
index, the cache objects mlx_lm's models talk to, decode working copies, and the managers."""
