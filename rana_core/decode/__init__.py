"""Decoding on a GPU: the engine that turns FLOP cuts into speed, its kernels, and the latency measurements.

- ``engine``: the batch-1 decode engine (static KV cache, the step captured as a CUDA graph);
- ``dense_kernels``: Triton kernels of the dense step (GEMV, fused norms, rotary into the cache, attention);
- ``masked_kernels``: Triton kernels of RaNA's masked products (compaction, gather, reduction);
- ``latency``: timing the engine dense and adapted, Hugging Face's generate, and the bandwidth floor.
"""
