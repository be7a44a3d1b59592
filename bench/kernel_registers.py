"""Registers per thread of the masked products' kernels, compiled for sm_90a on any machine (no GPU).

    python bench/kernel_registers.py [--config 64,64,2,1,16] [--sms 132] [--out PATH]

A program's registers decide how many programs a multiprocessor holds at once, and so how many waves a launch
takes: on the H200, 65,536 registers per multiprocessor. Each of rana_core/decode/masked_wide.py's launches at
Llama-2-7B's and SmolLM2-135M's masked products (RaNA −44% ranks) is compiled as the launch would compile it
(fp16 rows, pointers and the row stride divisible by 16, as Triton specialises them) and Triton's own ptxas
reports the registers; the table gives the programs a launch makes, how many fit on a multiprocessor, and the
waves. The list design's gather (rana_core/decode/masked_kernels.py, its configuration as gather_config() gives
it, RANA_GATHER_CONFIG included) follows in a second table, and the one-token GEMV (rana_core/decode/gemv.py, each
product tiled as gemv_config tiles it, with the options the engine gives it: the norm made in it, SwiGLU, a
masked input) in a third. Prints the three and writes bench/results/kernel-registers-sm90a.json.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rana_core.decode import gemv, masked_kernels, masked_wide  # noqa: E402

from shown_path import write_results  # noqa: E402

PRODUCTS = {  # name: (K per group, M, groups, column norms)
    "7B qkv A-part": (3441, 12288, 1, False),
    "7B gate/up A-parts": (3082, 11008, 2, False),
    "7B down (neurons)": (11008, 4096, 1, True),
    "SmolLM2 gate/up A-parts": (360, 1536, 2, False),
    "SmolLM2 down (neurons)": (1536, 576, 1, True),
}
REGISTERS_PER_SM = 65536
GEMVS = {  # name: (rows, columns, options: swiglu, norm, masked input, residual add / norm from its sums)
    "SmolLM2 qkv + norm": (960, 576, dict(NORM=True)),
    "SmolLM2 o_proj": (576, 576, {}),
    "SmolLM2 gate/up + norm": (3072, 576, dict(SWIGLU=True, NORM=True)),
    "SmolLM2 down": (576, 1536, {}),
    "SmolLM2 masked down": (576, 1536, dict(MASK_IN=True)),
    "7B qkv": (12288, 4096, {}),
    "7B gate/up": (22016, 4096, dict(SWIGLU=True)),
    "7B down": (4096, 11008, {}),
    "7B o_proj + residual sums": (4096, 4096, dict(ADD_RESIDUAL=True)),
    "7B down + residual sums": (4096, 11008, dict(ADD_RESIDUAL=True)),
    "7B qkv + norm from sums": (12288, 4096, dict(NORM=True, NORM_SUMS=True)),
    "7B gate/up + norm from sums": (22016, 4096, dict(SWIGLU=True, NORM=True, NORM_SUMS=True)),
}
GEMV_SIGNATURE = {"w_ptr": "*fp16", "x_ptr": "*fp16", "out_ptr": "*fp16", "N": "i32", "stride_n": "i32",
                  "delta_ptr": "*fp16", "norm_w_ptr": "*fp16", "res_out_ptr": "*fp16", "eps": "fp32", "tau": "fp32",
                  "in_tau_ptr": "*fp32", "in_scale_ptr": "*fp32", "res_in_ptr": "*fp16", "sums_ptr": "*fp32",
                  "n_sums": "i32"}


WIDE_SIGNATURE = {"rows_ptr": "*fp16", "coeff_ptr": "*fp16", "scale_ptr": "*fp32", "threshold_ptr": "*fp32",
                  "partial_ptr": "*fp32", "source_ptr": "*fp16", "K": "i32", "M": "i32", "stride_k": "i32"}
GATHER_SIGNATURE = {"rows_ptr": "*fp16", "index_ptr": "*i32", "value_ptr": "*fp32", "count_ptr": "*i32",
                    "partial_ptr": "*fp32", "K": "i32", "M": "i32", "stride_k": "i32"}


def registers(kernel, runtime: dict, constants: dict, warps: int, stages: int = 1,
              signature: dict | None = None, loop: dict | None = None) -> int:
    """ptxas's registers per thread of `kernel` compiled for sm_90a; with `loop` (a dict), the longest loop body
    of its PTX is counted into it (loop_counts)."""
    signature = {**(signature or WIDE_SIGNATURE), **runtime}
    signature.update({name: "constexpr" for name in constants})
    divisible = [i for i, name in enumerate(signature) if name.endswith("_ptr") or name in ("M", "stride_k")]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants,
                       attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    if loop is not None:
        loop.update(loop_counts(compiled.asm["ptx"]))
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(folder) / "k.cubin")],
                                capture_output=True, text=True, check=True).stderr
    return int(re.search(r"Used (\d+) registers", report).group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=",".join(map(str, masked_wide.CONFIG)),
                        help="BLOCK_M,BLOCK_K,warps,stages,programs per SM (masked_wide.CONFIG)")
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors (the H200's 132)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    os.environ["RANA_WIDE_CONFIG"] = args.config
    masked_wide.multiprocessors = lambda device: args.sms  # shape() sizes the launch for this GPU
    print(f"sm_90a, config {args.config}, {args.sms} multiprocessors")
    print(f"{'product':<26}{'kernel':>8}{'tiles/program':>15}{'programs':>10}{'registers':>11}{'per SM':>8}"
          f"{'waves':>7}")
    rows = []
    for product, (K, M, groups, with_scale) in PRODUCTS.items():
        block_m, block_k, warps, _, S = masked_wide.shape(K, M, groups, None)
        tiles = math.ceil(K / block_k)
        per_program = math.ceil(tiles / S)
        constants = dict(S=S, TILES=tiles, HAS_SCALE=with_scale, SHARED_COEFF=False, SOURCE_SPLITS=0,
                         BLOCK_K=block_k, BLOCK_M=block_m, WIDE=False, PDL=True)
        if per_program <= masked_wide.UNROLLED_TILES:
            kind, used = "unrolled", registers(masked_wide._wide_kernel, {}, dict(
                constants, PER_PROGRAM=per_program, PER_PROGRAM_P2=triton.next_power_of_2(per_program)), warps)
        else:
            kind, used = "loop", registers(masked_wide._wide_loop_kernel, {"per_program": "i32"},
                                           dict(constants, INTERPRET=False), warps)
        programs = math.ceil(M / block_m) * S * groups
        per_sm = REGISTERS_PER_SM // (used * 32 * warps)
        waves = math.ceil(programs / (per_sm * args.sms))
        print(f"{product:<26}{kind:>8}{per_program:>15}{programs:>10}{used:>11}{per_sm:>8}{waves:>7}", flush=True)
        rows.append({"product": product, "K": K, "M": M, "groups": groups, "kernel": kind, "tiles_per_program":
                     per_program, "programs": programs, "registers": used, "programs_per_sm": per_sm,
                     "waves": waves})
    gather_rows = list_gathers(args.sms)
    gemv_rows = gemvs(args.sms)
    write_results({"target": "sm_90a", "config": args.config, "multiprocessors": args.sms, "rows": rows,
                   "list_gather": {"config": masked_kernels.gather_config(), "rows": gather_rows},
                   "gemv": gemv_rows}, args.out, "kernel-registers", "sm90a")
    return 0


def loop_counts(ptx: str) -> dict:
    """In the longest loop of the PTX (a label to the branch back to it): its lines, global loads, barriers
    (bar.sync), warp shuffles and shared-memory stores: what one step costs beside its loads."""
    body = ""
    for label in re.findall(r"^(\$L__BB\d+_\d+):", ptx, re.M):
        start = ptx.index(label + ":")
        back = re.search(r"bra(\.uni)?\s+" + re.escape(label) + ";", ptx[start:])
        if back and back.end() > len(body):
            body = ptx[start:start + back.end()]
    return {name: len(re.findall(pattern, body)) for name, pattern in
            (("lines", r"\n"), ("global_loads", r"ld\.global"), ("barriers", r"bar\.sync"), ("shuffles", r"shfl"),
             ("shared_stores", r"st\.shared"))}


def list_gathers(sms: int) -> list[dict]:
    """The list design's gather launch at each product: its programs, registers, residency and waves."""
    block_m, block_k, warps, stages, planned, chunk_cap = masked_kernels.gather_config()
    masked_kernels.multiprocessors = lambda device: sms  # _list_splits sizes the launch for this GPU
    print(f"\nlist gather, config {block_m}-{block_k}-{warps}-{stages}-{planned} (BLOCK_M-BLOCK_K-warps-stages-"
          "programs per SM planned)")
    print(f"{'product':<26}{'splits':>8}{'programs':>10}{'registers':>11}{'per SM':>8}{'waves':>7}"
          f"   loop: {'PTX lines':>9}{'barriers':>9}{'shuffles':>9}")
    rows = []
    for product, (K, M, groups, _) in PRODUCTS.items():
        chunk = min(chunk_cap, triton.next_power_of_2(K))
        chunks = math.ceil(K / chunk)
        splits = masked_kernels._list_splits(K, M, groups, None)
        loop: dict = {}
        used = registers(masked_kernels._gather_kernel, {}, dict(
            SPLITS=splits, CHUNKS=chunks, CHUNKS_P2=triton.next_power_of_2(chunks), CHUNK=chunk, BLOCK_K=block_k,
            BLOCK_M=block_m, WIDE=False, INTERPRET=False, PDL=True), warps, stages,
            GATHER_SIGNATURE, loop)
        programs = math.ceil(M / block_m) * splits * groups
        per_sm = REGISTERS_PER_SM // (used * 32 * warps)
        waves = math.ceil(programs / (per_sm * sms))
        print(f"{product:<26}{splits:>8}{programs:>10}{used:>11}{per_sm:>8}{waves:>7}"
              f"         {loop['lines']:>9}{loop['barriers']:>9}{loop['shuffles']:>9}", flush=True)
        rows.append({"product": product, "K": K, "M": M, "groups": groups, "splits": splits, "programs": programs,
                     "registers": used, "programs_per_sm": per_sm, "waves": waves, "loop": loop})
    return rows


def gemvs(sms: int) -> list[dict]:
    """Each one-token GEMV of GEMVS in its gemv_config tile: its programs, registers, residency and waves."""
    print("\none-token GEMV (gemv_config's tiles, early weights)")
    print(f"{'product':<30}{'tile':>14}{'programs':>10}{'registers':>11}{'per SM':>8}{'waves':>7}")
    rows = []
    for product, (N, K, options) in GEMVS.items():
        swiglu = options.get("SWIGLU", False)
        c = gemv.gemv_config(K, swiglu)
        out_rows = N // 2 if swiglu else N
        used = registers(gemv._gemv_kernel, {}, dict(
            K=K, K_P2=triton.next_power_of_2(K), BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], SWIGLU=swiglu,
            MASKED=False, EARLY=True, NORM=options.get("NORM", False),
            HAS_DELTA=options.get("NORM", False) and not options.get("NORM_SUMS", False),
            MASK_IN=options.get("MASK_IN", False), HAS_SCALE=False, UP_X_OFFSET=0,
            ADD_RESIDUAL=options.get("ADD_RESIDUAL", False), NORM_SUMS=options.get("NORM_SUMS", False),
            SUMS_P2=512, PDL=True), c["num_warps"],
            c["num_stages"], GEMV_SIGNATURE)
        programs = math.ceil(out_rows / c["BLOCK_N"])
        per_sm = REGISTERS_PER_SM // (used * 32 * c["num_warps"])
        waves = math.ceil(programs / (per_sm * sms))
        tile = f"{c['BLOCK_N']}x{c['BLOCK_K']} {c['num_warps']}w{c['num_stages']}s"
        print(f"{product:<30}{tile:>14}{programs:>10}{used:>11}{per_sm:>8}{waves:>7}", flush=True)
        rows.append({"product": product, "N": N, "K": K, "tile": c, "programs": programs, "registers": used,
                     "programs_per_sm": per_sm, "waves": waves})
    return rows

if __name__ == "__main__":
    sys.exit(main())
