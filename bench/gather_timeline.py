"""Where a list gather's time goes, program by program (GPU): the gather of rana_core/decode/masked_kernels.py
with the GPU's nanosecond timer read at each phase of each program.

    python bench/gather_timeline.py [--densities 0.35,1] [--products "qkv A-part,down (neurons)"] [--out PATH]

Llama-2-7B's masked products at RaNA −44%'s ranks (bench/masked_designs.py's PRODUCTS), rows read from one of
several copies (64 MB in all) so that the L2 does not hold them. The compaction runs as the engine runs it, then
an instrumented copy of the gather kernel (the engine's helpers list_share, _list_entries and _gather_step, the
engine's launch shape) stamps, per program: its start, when its share is known (the chunk counts loaded), when its
first list entries have arrived, and when its rows are summed; each stamp waits for the value it follows, so it
marks that value's arrival (on the H200 the timer ticks in steps of ~0.26 µs: read the phases as multiples of
that). Per product: the gather's span (first start to last sum) and the active rows' TB/s over it, how the
programs' starts spread (waves), the phases' medians, and how many programs a multiprocessor held at once.
Prints a table and writes bench/results/gather-timeline-<device>.json.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from rana_core.decode import masked_kernels as mk  # noqa: E402

from masked_designs import L2_BYTES, PRODUCTS  # noqa: E402
from shown_path import write_results  # noqa: E402

STAMPS = 6  # start, share known, first entries in, rows summed, multiprocessor, listed rows


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _after(x):
    """The timer once every element of the int32 tensor x has arrived (the asm reads x)."""
    return tl.max(tl.inline_asm_elementwise("{ .reg .b32 t; mov.b32 t, $1; mov.u64 $0, %globaltimer; }", "=l,r",
                                            [x], dtype=tl.int64, is_pure=False, pack=1), axis=0)


@triton.jit
def _timed_gather(rows_ptr, index_ptr, value_ptr, count_ptr, partial_ptr, stamp_ptr, K, M, stride_k,
                  SPLITS: tl.constexpr, CHUNKS: tl.constexpr, CHUNKS_P2: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """masked_kernels.gather_share with stamps (the module's docstring)."""
    pid_m, pid_s, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = _now()
    sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    ends, starts, begin, stop = mk.list_share(count_ptr + g * CHUNKS, pid_s, CHUNKS, CHUNKS_P2, SPLITS, BLOCK_K)
    shared = _after(tl.full([1], 0, tl.int32) + stop)
    index_ptr += g * K
    value_ptr += g * K
    rows_ptr += g * K * stride_k
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    row, c, j_ok = mk._list_entries(begin, stop, ends, starts, index_ptr, value_ptr, CHUNK, BLOCK_K)
    entries = _after(row)
    for j0 in range(begin, stop, BLOCK_K):
        acc, row, c, j_ok = mk._gather_step(acc, j0, stop, ends, starts, row, c, j_ok, index_ptr, value_ptr,
                                            rows_ptr, stride_k, offs_m, m_ok, CHUNK, BLOCK_K, False)
    summed = _after(acc.to(tl.int32, bitcast=True))
    tl.store(partial_ptr + (g * SPLITS + pid_s) * M + offs_m, acc, mask=m_ok)
    program = (g * SPLITS + pid_s) * tl.num_programs(0) + pid_m
    out = stamp_ptr + program * 6
    tl.store(out, start)
    tl.store(out + 1, shared)
    tl.store(out + 2, entries)
    tl.store(out + 3, summed)
    tl.store(out + 4, sm.to(tl.int64))
    tl.store(out + 5, (stop - begin).to(tl.int64))


def timeline(rows, coeff, threshold, scale, groups) -> torch.Tensor:
    """One compaction as the engine launches it, then the instrumented gather: (programs, STAMPS) int64."""
    K_all, M = rows.shape
    K = K_all // groups
    mk.masked_rows_partials(rows, coeff, threshold, scale, groups=groups)  # fills the engine's list buffers
    block_m, block_k, warps, stages, _, chunk_cap = mk.gather_config()
    chunk = min(chunk_cap, triton.next_power_of_2(K))
    chunks = math.ceil(K / chunk)
    splits = mk._list_splits(K, M, groups, rows.device)
    index = mk.work_buffer("index", K_all, torch.int32, rows.device)
    value = mk.work_buffer("value", K_all, torch.float32, rows.device)
    count = mk.work_buffer("count", groups * chunks, torch.int32, rows.device)
    partial = torch.empty(groups * splits * M, dtype=torch.float32, device=rows.device)
    grid = (math.ceil(M / block_m), splits, groups)
    stamps = torch.zeros(math.prod(grid), STAMPS, dtype=torch.int64, device=rows.device)
    torch.cuda.synchronize()
    _timed_gather[grid](rows, index, value, count, partial, stamps, K, M, rows.stride(0), SPLITS=splits,
                        CHUNKS=chunks, CHUNKS_P2=triton.next_power_of_2(chunks), CHUNK=chunk, BLOCK_K=block_k,
                        BLOCK_M=block_m, num_warps=warps, num_stages=stages)
    torch.cuda.synchronize()
    return stamps.cpu()


def summarise(stamps: torch.Tensor, active_bytes: float) -> dict:
    start, shared, entries, summed, sm, listed = (stamps[:, i].double() for i in range(STAMPS))
    t0 = float(start.min())
    span = (float(summed.max()) - t0) / 1e3
    starts = sorted(float(s - t0) / 1e3 for s in start)
    resident = 0  # the most programs one multiprocessor held at once
    for unit in set(sm.long().tolist()):
        mine = sm == unit
        events = sorted([(float(s), 1) for s in start[mine]] + [(float(e), -1) for e in summed[mine]])
        held = 0
        for _, step in events:
            held += step
            resident = max(resident, held)
    median = lambda x: statistics.median(x.tolist()) / 1e3  # noqa: E731
    return {"programs": len(starts), "span_us": span, "tbs": active_bytes / span / 1e6,
            "start_quantiles_us": [starts[int(q * (len(starts) - 1))] for q in (0.25, 0.5, 0.75, 0.9, 1.0)],
            "share_us": median(shared - start), "entries_us": median(entries - shared),
            "rows_us": median(summed - entries), "program_us": median(summed - start),
            "listed_rows_median": statistics.median(listed.tolist()), "resident_per_sm": resident}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", default="0.35,1")
    parser.add_argument("--products", default="qkv A-part,gate/up A-parts,down (neurons)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    name = torch.cuda.get_device_name()
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"{name}, fp16, the list gather program by program (µs; starts: when the 25/50/75/90/100% quantile of "
          f"programs began, after the first)")
    print(f"{'product':<17}{'density':>8}{'programs':>9}{'span':>7}{'TB/s':>6}{'per SM':>7}   {'starts':<30}"
          f"{'share':>6}{'entries':>8}{'rows':>6}{'program':>8}")
    rows_out = []
    for product in args.products.split(","):
        K, M, groups, falls, with_scale = PRODUCTS[product]
        count = max(4, -(-L2_BYTES // (groups * K * M * 2)))
        copies = [torch.randn(groups * K, M, device="cuda", dtype=torch.float16, generator=g) / K ** 0.5
                  for _ in range(count)]
        decay = torch.exp(-3 * torch.arange(K, device="cuda") / K).repeat(groups) if falls else 1.0
        coeff = (torch.randn(groups * K, device="cuda", generator=g) * decay).half()
        scale = torch.rand(K, device="cuda", generator=g) + 0.5 if with_scale else None
        score = coeff.float().abs().view(groups, K) * (scale if scale is not None else 1.0)
        for density in [float(d) for d in args.densities.split(",")]:
            threshold = torch.quantile(score, 1 - density, dim=1).float() if density < 1 else \
                torch.zeros(groups, device="cuda")
            active_bytes = float((score >= threshold[:, None]).sum()) * M * 2
            runs = [summarise(timeline(copies[i % count], coeff, threshold, scale, groups), active_bytes)
                    for i in range(count + 3)][3:]  # the first calls compile and warm up
            best = min(runs, key=lambda r: r["span_us"])  # the least disturbed call
            q = "/".join(f"{s:.1f}" for s in best["start_quantiles_us"])
            print(f"{product:<17}{density:>8.2f}{best['programs']:>9}{best['span_us']:>7.1f}{best['tbs']:>6.2f}"
                  f"{best['resident_per_sm']:>7}   {q:<30}{best['share_us']:>6.2f}{best['entries_us']:>8.2f}"
                  f"{best['rows_us']:>6.2f}{best['program_us']:>8.2f}", flush=True)
            rows_out.append({"product": product, "density": density, "active_bytes": active_bytes, **best,
                             "spans_us": [r["span_us"] for r in runs]})
        copies = None
        torch.cuda.empty_cache()
    write_results({"device_name": name, "dtype": "float16", "config": mk.gather_config(), "rows": rows_out},
                  args.out, "gather-timeline", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
