"""Session 4's masked-product variants, checked and timed inside CUDA graphs in one GPU call (notes in
docs/latency.md). Not part of the product: what wins moves into rana_core/decode/masked_kernels.py.

    python bench/masked_variants.py

The question: the library's compact → gather → reduce costs time = a + bytes / b with b ≈ 2.5 TB/s (the GEMV's
bandwidth) but a ≈ 10 µs per product (three launches, and a chain of dependent loads: counts → list → rows).
Variants that attack a, at densities 0 (a alone) to 1:

- ``library``: rana_core.decode.masked_kernels as it is;
- ``predicated``: no compaction, no list: program (columns, K-range, group) loads its coefficients, decides the
  mask, and loads only the active rows (masked-off lanes fetch nothing), then the same reduce kernel;
- ``predicated+fused``: the same, and the last program of each column block adds the partials (an arrival
  counter, in a fixed order: deterministic), so one launch per product;
- ``… +pdl``: programmatic dependent launch: the next launch's programs start while this one drains, and wait
  (griddepcontrol.wait) before reading what it wrote.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rana_core.decode import latency
from rana_core.decode import masked_kernels as kernels  # noqa: E402
from rana_core.decode.gemv import gemv  # noqa: E402

from shown_path import shown  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@triton.jit
def predicated_kernel(rows_ptr, coeff_ptr, scale_ptr, threshold_ptr, partial_ptr, arrived_ptr, out_ptr, K, M,
                      stride_k, K_PER: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, GROUPS: tl.constexpr,
                      HAS_SCALE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                      FUSED: tl.constexpr, EPILOGUE: tl.constexpr, PDL: tl.constexpr):
    pid_m, pid_s, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    if PDL:
        tl.extra.cuda.gdc_wait()  # the coefficients come from the launch before
        tl.extra.cuda.gdc_launch_dependents()
    threshold = tl.load(threshold_ptr + g)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    begin = pid_s * K_PER
    for k0 in range(0, K_PER, BLOCK_K):
        offs_k = begin + k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        c = tl.load(coeff_ptr + g * K + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        score = tl.abs(c)
        if HAS_SCALE:
            score = score * tl.load(scale_ptr + g * K + offs_k, mask=k_ok, other=0.0)
        active = k_ok & (score >= threshold)
        tile = tl.load(rows_ptr + (g * K + offs_k)[:, None] * stride_k + offs_m[None, :],
                       mask=active[:, None] & m_ok[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32) * c[:, None], axis=0)
    tl.store(partial_ptr + (g * SPLITS + pid_s) * M + offs_m, acc, mask=m_ok)
    if FUSED:
        # the last of the column block's GROUPS·SPLITS programs to arrive adds every partial, in split order
        tl.debug_barrier()
        arrived = tl.atomic_add(arrived_ptr + pid_m, 1, sem="acq_rel", scope="gpu")
        if arrived == GROUPS * SPLITS - 1:
            split = tl.arange(0, SPLITS_P2)
            ok = (split[:, None] < SPLITS) & m_ok[None, :]
            tile = partial_ptr + split[:, None] * M + offs_m[None, :]
            first = tl.sum(tl.load(tile, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
            dtype = out_ptr.dtype.element_ty
            if EPILOGUE == 1:
                second = tl.sum(tl.load(tile + SPLITS * M, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
                first = kernels.swiglu(first, second, dtype)
            tl.store(out_ptr + offs_m, first.to(dtype), mask=m_ok)
            tl.store(arrived_ptr + pid_m, 0)  # ready for the next call


def predicated(rows, coeff, threshold, scale, groups, out, *, fused, pdl, block_k=128, block_m=64, warps=2,
               per_sm=16, epilogue="sum", buffers={}):
    K_all, M = rows.shape
    K = K_all // groups
    blocks = math.ceil(M / block_m)
    splits = max(1, min(math.ceil(K / block_k), math.ceil(per_sm * 132 / (blocks * groups))))
    k_per = math.ceil(math.ceil(K / splits) / block_k) * block_k
    splits = math.ceil(K / k_per)
    key = (groups * splits * M, blocks)
    if key not in buffers:
        buffers[key] = (torch.empty(groups * splits * M, dtype=torch.float32, device=rows.device),
                        torch.zeros(blocks, dtype=torch.int32, device=rows.device))
    partial, arrived = buffers[key]
    predicated_kernel[(blocks, splits, groups)](
        rows, coeff, scale if scale is not None else coeff, threshold, partial, arrived, out, K, M, rows.stride(0),
        k_per, SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), GROUPS=groups, HAS_SCALE=scale is not None,
        BLOCK_K=block_k, BLOCK_M=block_m, FUSED=fused, EPILOGUE={"sum": 0, "swiglu": 1}[epilogue], PDL=pdl,
        num_warps=warps, num_stages=3, launch_pdl=pdl)
    if not fused:
        kernels.reduce_partials(partial, splits, out, epilogue)
    return out


def case(label, K, M, scaled, groups, density):
    torch.manual_seed(0)
    rows = torch.randn(groups * K, M, device="cuda", dtype=torch.float16)
    coeff = torch.randn(groups * K, device="cuda", dtype=torch.float16)
    scale = torch.rand(groups * K, device="cuda") + 0.5 if scaled else None
    score = coeff.float().abs() * (scale if scale is not None else 1.0)
    q = torch.quantile(score[:K], 1 - density) if 0 < density < 1 else (score.max() + 1 if density == 0 else 0.0)
    threshold = torch.as_tensor(q, dtype=torch.float32, device="cuda").reshape(1).repeat(groups).contiguous()
    epilogue = "swiglu" if groups == 2 else "sum"
    out = torch.empty(M, device="cuda", dtype=torch.float16)
    mask = (score >= threshold.repeat_interleave(K)).double()
    parts = ((coeff.double() * mask).view(groups, K)[:, :, None] * rows.double().view(groups, K, M)).sum(1)
    reference = parts[0] if groups == 1 else torch.nn.functional.silu(parts[0]) * parts[1]
    variants = {
        "library": lambda: kernels.reduce_partials(*kernels.masked_rows_partials(rows, coeff, threshold, scale,
                                                                                 groups), out, epilogue),
        "predicated": lambda: predicated(rows, coeff, threshold, scale, groups, out, fused=False, pdl=False,
                                         epilogue=epilogue),
        "predicated+fused": lambda: predicated(rows, coeff, threshold, scale, groups, out, fused=True, pdl=False,
                                               epilogue=epilogue),
        "predicated+fused+pdl": lambda: predicated(rows, coeff, threshold, scale, groups, out, fused=True,
                                                   pdl=True, epilogue=epilogue),
        "predicated+fused bk256 w4": lambda: predicated(rows, coeff, threshold, scale, groups, out, fused=True,
                                                        pdl=False, epilogue=epilogue, block_k=256, warps=4),
        "predicated+fused per_sm 32": lambda: predicated(rows, coeff, threshold, scale, groups, out, fused=True,
                                                         pdl=False, epilogue=epilogue, per_sm=32),
    }
    active_bytes = max(density, 1e-9) * groups * K * M * 2
    results = []
    for name, fn in variants.items():
        row = {"variant": name}
        try:
            for _ in range(3):  # several calls: the fused variants' counters must reset themselves
                got = fn().double()
            scale_ref = reference.norm().item() or 1.0
            row["rel_error"] = float((got - reference).norm() / scale_ref)
            row["us"] = 1e3 * latency.graph_ms(fn, calls=20)
            row["active_gbs"] = active_bytes / row["us"] / 1e3
        except Exception as error:  # a variant that does not compile or run is a result too
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        results.append(row)
    dense_t = rows.t().contiguous()
    dense_us = 1e3 * latency.graph_ms(lambda: gemv(dense_t, coeff, torch.empty(M, device="cuda",
                                                                                dtype=torch.float16)), calls=20)
    results.append({"variant": "dense GEMV of the whole matrix", "us": dense_us,
                    "gbs": groups * K * M * 2 / dense_us / 1e3})
    return results


def chain_parts(K, M, scaled, groups, density) -> list[dict]:
    """The library's product cut after each launch (compact; + gather; + reduce), with and without PDL: where
    the fixed cost of a product goes."""
    import os

    rows = torch.randn(groups * K, M, device="cuda", dtype=torch.float16)
    coeff = torch.randn(groups * K, device="cuda", dtype=torch.float16)
    scale = torch.rand(groups * K, device="cuda") + 0.5 if scaled else None
    score = coeff.float().abs() * (scale if scale is not None else 1.0)
    q = torch.quantile(score[:K], 1 - density) if density > 0 else score.max() + 1
    threshold = torch.as_tensor(q, dtype=torch.float32, device="cuda").reshape(1).repeat(groups).contiguous()
    out = torch.empty(M, device="cuda", dtype=torch.float16)
    epilogue = "swiglu" if groups == 2 else "sum"
    chunk = min(kernels.COMPACT_CHUNK, triton.next_power_of_2(K))
    chunks = math.ceil(K / chunk)
    index = torch.empty(groups * K, dtype=torch.int32, device="cuda")
    value = torch.empty(groups * K, dtype=torch.float32, device="cuda")
    count = torch.empty(groups * chunks, dtype=torch.int32, device="cuda")

    def compact():
        p = kernels.pdl(rows)
        kernels._compact_kernel[(chunks, groups)](coeff, scale if scale is not None else coeff, threshold, index,
                                                  value, count, coeff, K=K, CHUNKS=chunks,
                                                  HAS_SCALE=scale is not None, CHUNK=chunk, SOURCE_SPLITS=0, PDL=p, num_warps=8, launch_pdl=p)

    parts = {"compact": compact,
             "compact+gather": lambda: kernels.masked_rows_partials(rows, coeff, threshold, scale, groups),
             "compact+gather+reduce": lambda: kernels.reduce_partials(
                 *kernels.masked_rows_partials(rows, coeff, threshold, scale, groups), out, epilogue)}
    results = []
    for setting in ("0", "1"):
        os.environ["RANA_PDL"] = setting
        for name, fn in parts.items():
            results.append({"pdl": setting == "1", "part": name, "us": 1e3 * latency.graph_ms(fn, calls=20)})
    os.environ.pop("RANA_PDL")
    return results


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains-only", action="store_true", help="only the launch-by-launch cut of the library")
    args = parser.parse_args(argv)
    name = latency.device_name("cuda")
    print(f"{name}, triton {triton.__version__}, torch {torch.__version__}")
    report = {"device_name": name, "cases": []}
    for label, K, M, scaled, groups in (("gate+up A (2 groups)", 3082, 11008, False, 2),
                                        ("down neuron", 11008, 4096, True, 1), ("qkv A", 3441, 12288, False, 1)):
        for density in () if args.chains_only else (0.0, 0.1, 0.35, 0.56, 1.0):
            results = case(label, K, M, scaled, groups, density)
            report["cases"].append({"kernel": label, "K": K, "M": M, "density": density, "results": results})
            print(f"\n{label} K={K} M={M} density {density}")
            for r in results:
                print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    report["chains"] = []
    for label, K, M, scaled, groups in (("gate+up A (2 groups)", 3082, 11008, False, 2),
                                        ("down neuron", 11008, 4096, True, 1), ("qkv A", 3441, 12288, False, 1)):
        for density in (0.0, 0.35):
            results = chain_parts(K, M, scaled, groups, density)
            report["chains"].append({"kernel": label, "density": density, "results": results})
            print(f"\n{label} density {density}: " + ", ".join(
                f"{r['part']}{' (pdl)' if r['pdl'] else ''} {r['us']:.1f} us" for r in results))
    out = RESULTS / f"masked-variants-{'chains-' if args.chains_only else ''}{name.replace(' ', '-').lower()}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {shown(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
