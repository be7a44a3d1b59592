"""Decode latency on a GPU: the engine (rana_core.decode.engine) dense and with RaNA at several budgets, Hugging Face's
eager `generate` for comparison, the memory-bandwidth floor, and a micro-benchmark of the masked-row kernel.

Used by the worker's `latency` job (rows for the latency_results table) and by bench/latency.py.
"""

from __future__ import annotations

import statistics
import time

import torch

from rana_core.decode.engine import SHAPES, DecodeEngine, Shape
from rana_core.progress import ProgressFn, no_progress

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def copy_bandwidth(device: str = "cuda", megabytes: int = 2048) -> float:
    """Bytes per second of a large device-to-device copy, counting the bytes read and the bytes written."""
    import triton.testing

    source = torch.randn(megabytes * (1 << 20) // 2, dtype=torch.float16, device=device)
    target = torch.empty_like(source)
    ms = triton.testing.do_bench(lambda: target.copy_(source), warmup=50, rep=300, return_mode="median")
    return 2 * source.numel() * source.element_size() / (ms / 1e3)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device))


def engine_rows(shape_name: str, dtype: str, budgets: list[float], contexts: list[int], new_tokens: int,
                device: str, bandwidth: float, progress: ProgressFn = no_progress,
                gemv: str = "triton", layers: str = "reference") -> list[dict]:
    """One row per (budget, context): median ms per token in the engine, with the dense engine's beside it (same
    GEMV and layer mode: rana_core.decode.engine.DecodeEngine.use_layer_kernels) and the floor (bytes one step
    must read over the measured copy bandwidth)."""
    shape = SHAPES[shape_name]
    budgets = sorted(set([0.0] + list(budgets)))
    rows, dense_ms = [], {}
    total = len(budgets) * len(contexts)
    for b_index, budget in enumerate(budgets):
        engine = DecodeEngine(shape, DTYPES[dtype], device, flop_reduction=budget, gemv=gemv)
        engine.calibrate()
        measured = engine.measure_flop_reduction()
        engine.use_layer_kernels(layers)
        weight_bytes = engine.weight_bytes_per_token()
        for c_index, context in enumerate(contexts):
            progress((b_index * len(contexts) + c_index) / total, f"{shape_name} −{budget:.0%} context {context}")
            ms = statistics.median(engine.time_decode(context, new_tokens))
            if budget == 0.0:
                dense_ms[context] = ms
            read = weight_bytes + engine.kv_bytes_per_token(context, new_tokens)
            rows.append({
                "model": shape_name, "device_name": device_name(device), "dtype": dtype, "engine": f"graphs+{gemv}" if layers == "reference" else f"{layers}+{gemv}",
                "flop_reduction": budget, "measured_flop_reduction": measured, "context_tokens": context,
                "new_tokens": new_tokens, "ms_per_token": ms, "dense_ms_per_token": dense_ms.get(context),
                "shapes": {**shape.__dict__, "bytes_per_token": read, "floor_ms": 1e3 * read / bandwidth,
                           "copy_bandwidth_gbs": bandwidth / 1e9},
            })
        del engine
        torch.cuda.empty_cache()
    progress(1.0, f"{shape_name} done")
    return rows


def hf_rows(shape_name: str, dtype: str, contexts: list[int], new_tokens: int, device: str) -> list[dict]:
    """Hugging Face `generate` (eager attention, its dynamic cache, greedy) with random weights of the same
    shape: ms per generated token, the prompt's prefill excluded (a 1-token generation is timed and taken off)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s: Shape = SHAPES[shape_name]
    config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         max_position_embeddings=4096, attn_implementation="eager", tie_word_embeddings=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    rows = []
    generator = torch.Generator(device=device).manual_seed(3)
    for context in contexts:
        prompt = torch.randint(0, s.vocab, (1, context), device=device, generator=generator)

        def generate(n: int) -> float:
            torch.cuda.synchronize()
            started = time.perf_counter()
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            return time.perf_counter() - started

        generate(2)  # warm-up
        one = statistics.median(generate(1) for _ in range(3))
        full = generate(new_tokens + 1)
        rows.append({"model": shape_name, "device_name": device_name(device), "dtype": dtype, "engine": "hf-eager",
                     "flop_reduction": 0.0, "measured_flop_reduction": 0.0, "context_tokens": context,
                     "new_tokens": new_tokens, "ms_per_token": 1e3 * (full - one) / new_tokens,
                     "dense_ms_per_token": None, "shapes": dict(s.__dict__)})
    del model
    torch.cuda.empty_cache()
    return rows


def measure_decode(payload: dict, device: str = "cuda", progress: ProgressFn = no_progress) -> list[dict]:
    """The `latency` job (payload validated by jobs.specs): engine rows for every budget and context."""
    if not torch.cuda.is_available():
        raise RuntimeError("latency measurement needs a CUDA GPU")
    bandwidth = copy_bandwidth(device)
    return engine_rows(payload["model"], payload["dtype"], payload["flop_reductions"], payload["contexts"],
                       payload["new_tokens"], device, bandwidth, progress)


def kernel_microbenchmark(device: str, dtype: str, bandwidth: float,
                          densities=(0.1, 0.2, 0.3, 0.5, 0.7, 1.0)) -> list[dict]:
    """Achieved bandwidth of the masked-row kernel on the bytes of its active rows, at Llama-2-7B sizes, each call
    replayed from a CUDA graph as in the engine (launched one by one from Python, these few-µs kernels would
    measure the launch, not the kernel)."""
    from rana_core.decode.masked_kernels import masked_rows_gemv

    results = []
    torch_dtype = DTYPES[dtype]
    for name, K, M, scaled in (("up/gate A-part", 3082, 11008, False), ("down neuron", 11008, 4096, True),
                               ("qkv A-part", 3440, 12288, False)):
        sets = [(torch.randn(K, M, device=device).to(torch_dtype), torch.randn(K, device=device).to(torch_dtype))
                for _ in range(3)]  # rotate inputs so that repeated runs do not measure the cache
        scale = torch.rand(K, device=device) + 0.5 if scaled else None
        out = torch.empty(M, device=device)
        for density in densities:
            score = sets[0][1].float().abs() * (scale if scale is not None else 1.0)
            threshold = (torch.quantile(score, 1 - density).reshape(1) if density < 1 else
                         torch.zeros(1, device=device))
            calls = iter(range(10**9))

            def run():
                rows, coeff = sets[next(calls) % 3]
                masked_rows_gemv(rows, coeff, threshold, scale, out=out)

            ms = graph_ms(run)
            active_bytes = density * K * M * sets[0][0].element_size()
            results.append({"kernel": name, "K": K, "M": M, "density": density, "us": ms * 1e3,
                            "active_gbs": active_bytes / (ms / 1e3) / 1e9,
                            "share_of_copy_bandwidth": active_bytes / (ms / 1e3) / bandwidth})
        dense_rows = sets[0][0]
        out_dense = torch.empty(M, device=device, dtype=torch_dtype)
        ms = graph_ms(lambda: torch.mv(dense_rows.t(), sets[0][1], out=out_dense))
        results.append({"kernel": f"{name} (dense cuBLAS)", "K": K, "M": M, "density": 1.0, "us": ms * 1e3,
                        "active_gbs": K * M * dense_rows.element_size() / (ms / 1e3) / 1e9,
                        "share_of_copy_bandwidth": K * M * dense_rows.element_size() / (ms / 1e3) / bandwidth})
    return results


def graph_ms(fn, calls: int = 30) -> float:
    """Median ms of one call of fn, `calls` calls captured per CUDA graph (no launch overhead, as in the
    engine's replayed step)."""
    import triton.testing

    def many():
        for _ in range(calls):
            fn()

    return triton.testing.do_bench_cudagraph(many, rep=100, return_mode="median") / calls
