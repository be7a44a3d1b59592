"""The stages of the persistent layer kernel (rana_core.decode.layer_kernel), as Triton device functions: each
takes its program's id and the program count and works through its items (tiles, chunks, list shares, heads)
p, p + programs, …, so that any number of resident programs covers any stage. ``next_phase`` is the barrier
between two stages.
"""

from __future__ import annotations

from rana_core.decode.launch import triton

if triton is not None:
    import triton.language as tl

    from rana_core.decode.attention_kernels import attention_chunk, combine_head
    from rana_core.decode.dense_kernels import rope_head
    from rana_core.decode.masked_kernels import compact_chunk, gather_share, list_chunk, swiglu

    @triton.jit
    def _now():
        """The GPU's global nanosecond timer (the same clock on every multiprocessor)."""
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                         pack=1)

    @triton.jit
    def _load_acquire(ptr):
        """ptr's int32 read from L2 with acquire semantics: a plain load, so that hundreds of waiting programs do
        not queue read-modify-write atomics on the one address their arrivals need."""
        return tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
                                         is_pure=False, pack=1)

    @triton.jit
    def next_phase(bar_ptr, clock_ptr, phase, pid, programs, PERSISTENT: tl.constexpr, LOAD_POLL: tl.constexpr,
                   CLOCK: tl.constexpr):
        """The barrier between two stages of a persistent launch (staged: nothing): count this program in and wait
        until all `programs` have arrived `phase + 1` times; the stores of every program before its arrival are
        visible to every program after its wait (release on arrival, acquire on the wait). Returns phase + 1.

        LOAD_POLL: wait by acquire loads (else by atomic adds of 0, the first design). CLOCK: record in
        clock[1 + 2·phase] the last arrival's time and in clock[2 + 2·phase] when program 0 left the barrier
        (bench/layer_kernel.py --clock: each stage's work and each barrier's latency inside the launch)."""
        if PERSISTENT:
            tl.debug_barrier()
            if CLOCK:
                tl.atomic_max(clock_ptr + 1 + 2 * phase, _now())
            tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
            target = (phase + 1) * programs
            if LOAD_POLL:
                seen = _load_acquire(bar_ptr)
                while seen < target:
                    seen = _load_acquire(bar_ptr)
            else:
                seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
                while seen < target:
                    seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
            tl.debug_barrier()
            if CLOCK:
                if pid == 0:
                    tl.store(clock_ptr + 2 + 2 * phase, _now())
        return phase + 1

    @triton.jit
    def inverse_rms(x_ptr, eps, H: tl.constexpr, BLOCK_H: tl.constexpr):
        offs = tl.arange(0, BLOCK_H)
        x = tl.load(x_ptr + offs, mask=offs < H, other=0.0, cache_modifier=".cg").to(tl.float32)
        return 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)

    @triton.jit
    def _input_chunk(x_ptr, norm_ptr, inv_rms, offs_k, k_ok, NORM: tl.constexpr, dtype):
        """A chunk of a product's input in float32: x itself, or RMSNorm(x)·weight rounded as the reference
        engine's add_rmsnorm stores it."""
        x = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        if NORM:
            weight = tl.load(norm_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            x = ((x * inv_rms).to(dtype).to(tl.float32) * weight).to(dtype).to(tl.float32)
        return x

    @triton.jit
    def _gemv_epilogue(acc, acc_up, offs_n, n_ok, out_ptr, resid_ptr, EPILOGUE: tl.constexpr):
        """A tile's outputs from its accumulators: y (0), silu(gate)·up (1) or resid + y rounded first (2)."""
        dtype = out_ptr.dtype.element_ty
        y = tl.sum(acc, axis=1)
        if EPILOGUE == 1:
            y = swiglu(y, tl.sum(acc_up, axis=1), dtype)
        if EPILOGUE == 2:
            y = y.to(dtype).to(tl.float32) + tl.load(resid_ptr + offs_n, mask=n_ok, other=0.0,
                                                      cache_modifier=".cg").to(tl.float32)
        tl.store(out_ptr + offs_n, y.to(dtype), mask=n_ok)

    @triton.jit
    def _gemv_chunk(acc, acc_up, w_ptr, x_ptr, norm_ptr, inv_rms, offs_n, n_ok, k0, N: tl.constexpr,
                    K: tl.constexpr, NORM: tl.constexpr, EPILOGUE: tl.constexpr, BLOCK_K: tl.constexpr, dtype):
        """The accumulators plus one BLOCK_K-wide chunk of a tile's rows times the input."""
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = _input_chunk(x_ptr, norm_ptr, inv_rms, offs_k, k_ok, NORM, dtype)
        ok = n_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], mask=ok, other=0.0)
        acc += w.to(tl.float32) * x[None, :]
        if EPILOGUE == 1:
            w_up = tl.load(w_ptr + (N + offs_n[:, None]).to(tl.int64) * K + offs_k[None, :], mask=ok, other=0.0)
            acc_up += w_up.to(tl.float32) * x[None, :]
        return acc, acc_up

    @triton.jit
    def _gemv_flat_step(acc, acc_up, step, w_ptr, x_ptr, norm_ptr, inv_rms, out_ptr, resid_ptr, pid, programs,
                        N: tl.constexpr, K: tl.constexpr, K_STEPS: tl.constexpr, NORM: tl.constexpr,
                        EPILOGUE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, dtype):
        """Step `step` of a program's flat GEMV loop: chunk step % K_STEPS of its tile step // K_STEPS, the tile's
        outputs stored (and the accumulators cleared) after its last chunk."""
        offs_n = (pid + step // K_STEPS * programs) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc, acc_up = _gemv_chunk(acc, acc_up, w_ptr, x_ptr, norm_ptr, inv_rms, offs_n, offs_n < N,
                                  step % K_STEPS * BLOCK_K, N, K, NORM, EPILOGUE, BLOCK_K, dtype)
        if step % K_STEPS == K_STEPS - 1:
            _gemv_epilogue(acc, acc_up, offs_n, offs_n < N, out_ptr, resid_ptr, EPILOGUE)
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        return acc, acc_up

    @triton.jit
    def gemv_stage(w_ptr, x_ptr, norm_ptr, inv_rms, out_ptr, resid_ptr, pid, programs,
                   N: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, EPILOGUE: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FLAT: tl.constexpr, INTERPRET: tl.constexpr):
        """out = W x over tiles of BLOCK_N rows (program p takes tiles p, p + programs, …). EPILOGUE 0: out = y;
        1: W is [gate; up] (2N rows) and out = silu(gate·x)·(up·x); 2: out = resid + y (y rounded first, as
        the reference adds a stored product to the residual).

        FLAT: one loop over all of a program's (tile, chunk) steps, so the compiler's software pipeline keeps
        the next tile's loads in flight while a tile ends (tile by tile, each tile's loop starts its pipeline
        anew: the stage profile of session 10 measured 1.3-2.9 TB/s that way)."""
        dtype = out_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if FLAT:
            K_STEPS: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
            steps = tl.maximum(tl.cdiv(tl.cdiv(N, BLOCK_N) - pid, programs), 0) * K_STEPS
            if INTERPRET:  # the interpreter takes no program-dependent range bound; a while loop it does
                step = 0
                while step < steps:
                    acc, acc_up = _gemv_flat_step(acc, acc_up, step, w_ptr, x_ptr, norm_ptr, inv_rms, out_ptr,
                                                  resid_ptr, pid, programs, N, K, K_STEPS, NORM, EPILOGUE, BLOCK_N,
                                                  BLOCK_K, dtype)
                    step += 1
            else:
                for step in range(0, steps):
                    acc, acc_up = _gemv_flat_step(acc, acc_up, step, w_ptr, x_ptr, norm_ptr, inv_rms, out_ptr,
                                                  resid_ptr, pid, programs, N, K, K_STEPS, NORM, EPILOGUE, BLOCK_N,
                                                  BLOCK_K, dtype)
        else:
            tile = pid
            while tile < tl.cdiv(N, BLOCK_N):
                offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
                n_ok = offs_n < N
                acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
                acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    acc, acc_up = _gemv_chunk(acc, acc_up, w_ptr, x_ptr, norm_ptr, inv_rms, offs_n, n_ok, k0, N, K,
                                              NORM, EPILOGUE, BLOCK_K, dtype)
                _gemv_epilogue(acc, acc_up, offs_n, n_ok, out_ptr, resid_ptr, EPILOGUE)
                tile += programs

    @triton.jit
    def compact_stage(coeff_ptr, scale_ptr, threshold_ptr, index_ptr, value_ptr, count_ptr, source_ptr, pid,
                       programs, KC: tl.constexpr, GROUPS: tl.constexpr, HAS_SCALE: tl.constexpr,
                       CHUNK: tl.constexpr, SOURCE_SPLITS: tl.constexpr):
        """Each (chunk, group) of a masked product's coefficients compacted to its list of active entries
        (masked_kernels.compact_chunk; with SOURCE_SPLITS, down's coefficients h made from gate/up's partials)."""
        chunks: tl.constexpr = (KC + CHUNK - 1) // CHUNK
        item = pid
        while item < chunks * GROUPS:
            compact_chunk(item % chunks, item // chunks, coeff_ptr, scale_ptr, threshold_ptr, index_ptr, value_ptr,
                          count_ptr, source_ptr, KC, chunks, HAS_SCALE, CHUNK, SOURCE_SPLITS)
            item += programs

    @triton.jit
    def normed_compact_stage(x_ptr, norm_ptr, eps, coeff_ptr, scale_ptr, threshold_ptr, index_ptr, value_ptr,
                             count_ptr, pid, programs, H: tl.constexpr, BLOCK_H: tl.constexpr,
                             HAS_SCALE: tl.constexpr, CHUNK: tl.constexpr):
        """An input mask's list (TEAL, WINA): each chunk of the RMSNorm of x (every item computes the norm's scale
        itself), written to coeff as the reference stores it, and its entries whose score |x̂|(·scale) reaches
        the threshold listed."""
        chunks: tl.constexpr = (H + CHUNK - 1) // CHUNK
        dtype = coeff_ptr.dtype.element_ty
        item = pid
        while item < chunks:
            offs = item * CHUNK + tl.arange(0, CHUNK)
            ok = offs < H
            coeff = _input_chunk(x_ptr, norm_ptr, inverse_rms(x_ptr, eps, H, BLOCK_H), offs, ok, True, dtype)
            tl.store(coeff_ptr + offs, coeff.to(dtype), mask=ok)
            list_chunk(item, 0, coeff.to(dtype), offs, ok, scale_ptr, threshold_ptr, index_ptr, value_ptr, count_ptr,
                       H, chunks, HAS_SCALE, CHUNK)
            item += programs

    @triton.jit
    def gather_stage(rows_ptr, index_ptr, value_ptr, count_ptr, partial_ptr, pid, programs, KC: tl.constexpr,
                      M: tl.constexpr, GROUPS: tl.constexpr, SPLITS: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, INTERPRET: tl.constexpr):
        """Each (columns, share of the list, group): the listed rows times their coefficients, into
        partial[g, share, :] (masked_kernels.gather_share: equal shares of the *active* rows, full tiles)."""
        chunks: tl.constexpr = (KC + CHUNK - 1) // CHUNK
        # the chunk count rounded up to a power of two (gather_share holds the chunks' ends in one block)
        chunks_p2: tl.constexpr = 1 if chunks == 1 else (2 if chunks == 2 else (4 if chunks <= 4 else (
            8 if chunks <= 8 else (16 if chunks <= 16 else 32))))
        blocks_m: tl.constexpr = (M + BLOCK_M - 1) // BLOCK_M
        item = pid
        while item < blocks_m * SPLITS * GROUPS:
            gather_share(item % blocks_m, (item // blocks_m) % SPLITS, item // (blocks_m * SPLITS), rows_ptr,
                         index_ptr, value_ptr, count_ptr, partial_ptr, KC, M, M, SPLITS, chunks, chunks_p2, CHUNK,
                         BLOCK_K, BLOCK_M, False, INTERPRET)
            item += programs

    @triton.jit
    def _summed(partial_ptr, offs, ok, N: tl.constexpr, SPLITS: tl.constexpr):
        """Σ_s partial[s, offs] over SPLITS rows of N float32 partial sums, in a fixed order."""
        total = tl.load(partial_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg")
        for s in tl.static_range(1, SPLITS):
            total += tl.load(partial_ptr + s * N + offs, mask=ok, other=0.0, cache_modifier=".cg")
        return total

    @triton.jit
    def rope_stage(qkv_ptr, cos_ptr, sin_ptr, pos, q_ptr, k_cache_ptr, v_cache_ptr, max_seq, pid, programs,
                   HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, SPLITS: tl.constexpr):
        """Items h < HEADS + KV_HEADS: dense_kernels.rope_head (q rotated; k rotated and v into the cache)."""
        h = pid
        while h < HEADS + KV_HEADS:
            rope_head(h, qkv_ptr, cos_ptr, sin_ptr, pos, q_ptr, k_cache_ptr, v_cache_ptr, max_seq, HEADS, KV_HEADS,
                      HALF, SPLITS)
            h += programs

    @triton.jit
    def attention_stage(q_ptr, k_cache_ptr, v_cache_ptr, pos, m_ptr, l_ptr, acc_ptr, max_seq, scale, pid,
                        programs, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, MAX_CHUNKS: tl.constexpr,
                        CHUNK: tl.constexpr, D: tl.constexpr):
        """Items (j, s): dense_kernels.attention_chunk over the chunks up to pos (those past it are skipped)."""
        chunks = pos // CHUNK + 1
        item = pid
        while item < KV_HEADS * chunks:
            attention_chunk(item // chunks, item % chunks, q_ptr, k_cache_ptr, v_cache_ptr, pos, m_ptr, l_ptr,
                            acc_ptr, max_seq, scale, MAX_CHUNKS, GROUP, CHUNK, D, False)
            item += programs

    @triton.jit
    def combine_stage(m_ptr, l_ptr, acc_ptr, out_ptr, pos, pid, programs, HEADS: tl.constexpr,
                      MAX_CHUNKS: tl.constexpr, CHUNKS_P2: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr):
        """Items h < HEADS: dense_kernels.combine_head over the chunks up to pos."""
        h = pid
        while h < HEADS:
            combine_head(h, m_ptr, l_ptr, acc_ptr, out_ptr, pos // CHUNK + 1, MAX_CHUNKS, CHUNKS_P2, D)
            h += programs

    @triton.jit
    def residual_stage(partial_ptr, resid_ptr, out_ptr, pid, programs, H: tl.constexpr, SPLITS: tl.constexpr,
                        BLOCK: tl.constexpr):
        """out = resid + (Σ partial sums, rounded)."""
        dtype = out_ptr.dtype.element_ty
        block = pid
        while block < tl.cdiv(H, BLOCK):
            offs = block * BLOCK + tl.arange(0, BLOCK)
            ok = offs < H
            y = _summed(partial_ptr, offs, ok, H, SPLITS).to(dtype).to(tl.float32)
            y += tl.load(resid_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
            tl.store(out_ptr + offs, y.to(dtype), mask=ok)
            block += programs
