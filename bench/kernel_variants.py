"""Variants of the masked row-sum kernel, checked and timed in one GPU call (design notes in
docs/latency.md). Not part of the product: the winner moves into rana_core/decode/masked_kernels.py.

    python bench/kernel_variants.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rana_core.decode.masked_kernels import reference_masked_rows  # noqa: E402


@triton.jit
def predicated(rows_ptr, coeff_ptr, scale_ptr, thr_ptr, out_ptr, K, M, stride_k, K_PER: tl.constexpr,
               HAS_SCALE: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, SKIP: tl.constexpr):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < M
    thr = tl.load(thr_ptr)
    acc = tl.zeros([BM], dtype=tl.float32)
    for k0 in range(0, K_PER, BK):
        offs_k = pid_k * K_PER + k0 + tl.arange(0, BK)
        k_ok = offs_k < K
        c = tl.load(coeff_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        s = tl.abs(c)
        if HAS_SCALE:
            s = s * tl.load(scale_ptr + offs_k, mask=k_ok, other=0.0)
        active = k_ok & (s >= thr)
        if SKIP:
            if tl.sum(active.to(tl.int32), axis=0) > 0:
                tile = tl.load(rows_ptr + offs_k[:, None] * stride_k + offs_m[None, :],
                               mask=active[:, None] & m_ok[None, :], other=0.0)
                acc += tl.sum(tile.to(tl.float32) * c[:, None], axis=0)
        else:
            tile = tl.load(rows_ptr + offs_k[:, None] * stride_k + offs_m[None, :],
                           mask=active[:, None] & m_ok[None, :], other=0.0)
            acc += tl.sum(tile.to(tl.float32) * c[:, None], axis=0)
    tl.store(out_ptr + pid_k * M + offs_m, acc, mask=m_ok)


@triton.jit
def compacted(rows_ptr, coeff_ptr, scale_ptr, thr_ptr, out_ptr, scratch_ptr, K, M, stride_k, K_PER: tl.constexpr,
              HAS_SCALE: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr):
    """Each program compacts the active rows of its K-chunk into a scratch list, then reads only those."""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    num_m = tl.num_programs(0)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < M
    thr = tl.load(thr_ptr)
    local = tl.arange(0, K_PER)
    offs_k = pid_k * K_PER + local
    k_ok = offs_k < K
    c_all = tl.load(coeff_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    s = tl.abs(c_all)
    if HAS_SCALE:
        s = s * tl.load(scale_ptr + offs_k, mask=k_ok, other=0.0)
    active = k_ok & (s >= thr)
    slot = tl.cumsum(active.to(tl.int32), axis=0) - 1
    count = tl.sum(active.to(tl.int32), axis=0)
    base = scratch_ptr + (pid_k * num_m + pid_m) * K_PER
    tl.store(base + slot, offs_k, mask=active)
    tl.debug_barrier()
    acc = tl.zeros([BM], dtype=tl.float32)
    for j0 in range(0, count, BK):
        j = j0 + tl.arange(0, BK)
        j_ok = j < count
        idx = tl.load(base + j, mask=j_ok, other=0)
        c = tl.load(coeff_ptr + idx, mask=j_ok, other=0.0).to(tl.float32)
        tile = tl.load(rows_ptr + idx[:, None] * stride_k + offs_m[None, :], mask=j_ok[:, None] & m_ok[None, :],
                       other=0.0)
        acc += tl.sum(tile.to(tl.float32) * c[:, None], axis=0)
    tl.store(out_ptr + pid_k * M + offs_m, acc, mask=m_ok)


def launch(kind, rows, coeff, thr, scale, out, scratch, bk, bm, warps, stages, per_sm, k_per=None):
    if kind == "fullk":
        return run_production(rows, coeff, thr, scale, out, bk, bm, warps, stages)
    K, M = rows.shape
    m_blocks = math.ceil(M / bm)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if k_per is None:
        splits = max(1, min(math.ceil(K / bk), math.ceil(per_sm * sms / m_blocks)))
        k_per = math.ceil(math.ceil(K / splits) / bk) * bk
    if kind == "compacted":
        k_per = triton.next_power_of_2(k_per)
    grid = (m_blocks, math.ceil(K / k_per))
    partial = out[: grid[1] * M].view(grid[1], M)  # one row of partial sums per K-split, summed below
    if kind == "compacted":
        compacted[grid](rows, coeff, scale if scale is not None else coeff, thr, partial, scratch, K, M, rows.stride(0),
                        K_PER=k_per, HAS_SCALE=scale is not None, BK=bk, BM=bm, num_warps=warps, num_stages=stages)
    else:
        predicated[grid](rows, coeff, scale if scale is not None else coeff, thr, partial, K, M, rows.stride(0),
                         K_PER=k_per, HAS_SCALE=scale is not None, BK=bk, BM=bm, SKIP=kind == "skip",
                         num_warps=warps, num_stages=stages)
    return partial.sum(0).half()


VARIANTS = [("compacted", 64, 128, 4, 3, 8)]  # the best split-K variant so far; now fewer stages, wider rows
for bk, bm, warps, stages, per_sm in ((64, 128, 4, 1, 8), (64, 128, 4, 2, 8), (32, 128, 4, 1, 16),
                                      (32, 256, 4, 1, 8), (32, 256, 8, 1, 16), (64, 256, 8, 1, 8),
                                      (64, 256, 8, 2, 16), (16, 256, 4, 1, 16), (64, 128, 4, 1, 16),
                                      (64, 128, 4, 1, 32), (32, 128, 2, 1, 16), (128, 128, 8, 1, 8)):
    VARIANTS.append(("compacted", bk, bm, warps, stages, per_sm))


def run_production(rows, coeff, thr, scale, out, bk, bm, warps, stages):
    from rana_core.decode import masked_kernels as kernels

    kernels.BLOCK_K, kernels.BLOCK_M, kernels.NUM_WARPS, kernels.NUM_STAGES = bk, bm, warps, stages
    half = torch.empty(rows.shape[1], dtype=rows.dtype, device=rows.device)  # written in fp16 directly
    return kernels.masked_rows_gemv(rows, coeff, thr, scale, out=half)


DENSITIES = (0.3, 0.5, 1.0)


def main():
    dtype = torch.float16
    copy = torch.randn(1 << 30, dtype=dtype, device="cuda")
    target = torch.empty_like(copy)
    bw = 2 * copy.numel() * 2 / (triton.testing.do_bench(lambda: target.copy_(copy), return_mode="median") / 1e3)
    del copy, target
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    for name, K, M, scaled in (("down", 11008, 4096, True), ("upA", 3082, 11008, False)):
        sets = [(torch.randn(K, M, device="cuda").to(dtype), torch.randn(K, device="cuda").to(dtype)) for _ in range(3)]
        scale = torch.rand(K, device="cuda") + 0.5 if scaled else None
        out = torch.empty(64 * M, device="cuda")
        scratch = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device="cuda")
        dense_ms = triton.testing.do_bench(lambda: torch.nn.functional.linear(sets[0][1][None], sets[0][0].T),
                                           return_mode="median")
        print(f"\n{name} K={K} M={M}: cuBLAS dense {dense_ms * 1e3:.1f} us "
              f"({K * M * 2 / dense_ms / 1e6:.0f} GB/s)")
        print(f"{'variant':<34}" + "".join(f"{d:>10.2f}" for d in DENSITIES) + "   (us; error)")
        for kind, bk, bm, warps, stages, per_sm in VARIANTS:
            cells, worst = [], 0.0
            try:
                for density in DENSITIES:
                    s0 = sets[0][1].float().abs() * (scale if scale is not None else 1.0)
                    thr = (torch.quantile(s0, 1 - density).reshape(1) if density < 1 else torch.zeros(1, device="cuda"))
                    for rows, coeff in sets:  # fresh inputs, poisoned output: check every variant
                        out.fill_(float("nan"))
                        got = launch(kind, rows, coeff, thr, scale, out, scratch, bk, bm, warps, stages, per_sm)
                        ref = reference_masked_rows(rows, coeff, thr, scale)
                        err = float((got.float() - ref).norm() / ref.norm())
                        worst = max(worst, err if err == err else float("inf"))
                    calls = iter(range(10**9))

                    def run():
                        rows, coeff = sets[next(calls) % 3]
                        launch(kind, rows, coeff, thr, scale, out, scratch, bk, bm, warps, stages, per_sm)

                    cells.append(triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median") * 1e3)
                label = f"{kind} bk{bk} bm{bm} w{warps} s{stages} x{per_sm}"
                print(f"{label:<34}" + "".join(f"{c:>10.1f}" for c in cells) + f"   {worst:.1e}", flush=True)
            except Exception as exc:  # a variant that does not compile is reported, not fatal
                print(f"{kind} bk{bk} bm{bm}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}", flush=True)


if __name__ == "__main__":
    main()
