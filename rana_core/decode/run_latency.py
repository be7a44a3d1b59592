"""How fast a stored run decodes on this GPU: the engine of the run (its model's weights and its own adapters,
rana_core.decode.from_model) against the engine of the dense model, the same engine on the same device.

For each context length: the median ms per token over `new_tokens` graph-replayed steps for both, and the floor
(the bytes a step must read over the measured copy bandwidth). Per layer: the share of the QKV and MLP FLOPs the
masks kept on held-out text, and the time of the layer's QKV product, the rest of its attention, and its MLP in a
profiled replay (timing events recorded inside the captured graph between the sections; the events cost a little,
so the sections add up to slightly more than an unprofiled step). With `batches`, each context also times B
sequences decoding together (rana_core.decode.batch_step: one graph-replayed step makes one token for each) for
both engines: what serving several streams at once keeps of the run's speed-up.

    report = measure_run(loaded.model, adapters, [1, 512], 256, "bfloat16", "cuda:0", held_out_tokens,
                         batches=[4, 8])
"""

from __future__ import annotations

import statistics

import torch

from rana_core.decode.batch_step import BatchDecoder, unsupported
from rana_core.decode.engine import DecodeEngine
from rana_core.decode.from_model import engine_from_model
from rana_core.decode.latency import DTYPES, copy_bandwidth, device_name
from rana_core.errors import RanaError
from rana_core.progress import ProgressFn, no_progress

PROFILE_REPLAYS = 20


def check_contexts(config, contexts: list[int], new_tokens: int) -> None:
    """One line when a context and its new tokens do not fit the model's positions."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max(contexts) + new_tokens + 8 > positions:
        raise RanaError(f"context {max(contexts)} with {new_tokens} new tokens does not fit the model's "
                        f"{positions} positions")


def measure_run(model, adapters: list, contexts: list[int], new_tokens: int, dtype: str, device: str,
                text: torch.Tensor, progress: ProgressFn = no_progress, layers: str = "reference",
                batches: list[int] = ()) -> dict:
    """The run's decode speed (rows per context), the dense model's beside it (both in the same `layers` mode:
    DecodeEngine.use_layer_kernels), and per-layer sections. `text`: held-out windows (n, seq) on which the
    masks' kept shares are counted. `batches`: batch sizes (2-16) also timed at each context, in each row's
    "batches" (batch_rows)."""
    check_contexts(model.config, contexts, new_tokens)
    torch_dtype = DTYPES[dtype]
    progress(0.0, "copy bandwidth")
    bandwidth = copy_bandwidth(device)
    text = text.to(device)
    dense = engine_from_model(model, [], torch_dtype, device)
    adapted = engine_from_model(model, adapters, torch_dtype, device)
    refused = unsupported(adapted) if batches else None
    if refused:  # before any timing: one line, nothing measured in vain
        raise RanaError(f"batches: {refused}")
    progress(0.05, "counting the masks on held-out text")
    measured = adapted.flop_reduction_on(text)
    dense.use_layer_kernels(layers)
    adapted.use_layer_kernels(layers)
    layers = layer_shares(adapted)
    weight_bytes = {"dense": dense.weight_bytes_per_token(), "adapted": adapted.weight_bytes_per_token()}
    rows = []
    for index, context in enumerate(contexts):
        progress(0.1 + 0.8 * index / len(contexts), f"context {context}: {new_tokens} steps, dense and adapted")
        ms = {name: statistics.median(engine.time_decode(context, new_tokens))
              for name, engine in (("dense", dense), ("adapted", adapted))}
        floors = {name: 1e3 * (weight_bytes[name] + engine.kv_bytes_per_token(context, new_tokens)) / bandwidth
                  for name, engine in (("dense", dense), ("adapted", adapted))}
        rows.append({"context_tokens": context, "new_tokens": new_tokens, "ms_per_token": ms["adapted"],
                     "dense_ms_per_token": ms["dense"], "floor_ms": floors["adapted"],
                     "dense_floor_ms": floors["dense"],
                     "batches": batch_rows(dense, adapted, batches, context, new_tokens)})
    progress(0.9, "profiled replay")
    sections = section_times(adapted, contexts[-1], new_tokens)
    for layer in layers:
        layer.update({f"{name}_ms": sections.get((layer["layer"], name)) for name in ("qkv", "attention", "mlp")})
    progress(1.0, "measured")
    return {"device_name": device_name(device), "dtype": dtype,
            "engine": "graphs+triton" if layers == "reference" else f"{layers}+triton",
            "measured_flop_reduction": measured, "copy_bandwidth_gbs": bandwidth / 1e9, "rows": rows,
            "layers": layers, "section_costs": section_costs(layers), "head_ms": sections.get((len(layers), "head"))}


def batch_rows(dense: DecodeEngine, adapted: DecodeEngine, batches: list[int], context: int,
               new_tokens: int) -> list[dict]:
    """For each batch size B: the median ms of a step that makes one token for each of B sequences (prompts of
    `context` random tokens, the same for both engines), for both engines, and the tokens per second that makes.
    Dense products through batch_gemv's Triton kernel (each weight read once for the B rows), masked ones over
    every row with each token's own mask (BatchDecoder's defaults for masked products)."""
    rows = []
    generator = torch.Generator().manual_seed(5)
    for batch in batches:
        prompts = [torch.randint(0, dense.shape.vocab, (context,), generator=generator).to(dense.device)
                   for _ in range(batch)]
        ms = {}
        for name, engine in (("dense", dense), ("adapted", adapted)):
            decoder = BatchDecoder(engine, batch, context + new_tokens + 8, products="triton")
            decoder.prefill(prompts)
            ms[name] = statistics.median(decoder.time_decode(new_tokens))
            del decoder  # its caches: B times the engine's
        rows.append({"batch": batch, "ms_per_step": ms["adapted"], "dense_ms_per_step": ms["dense"],
                     "tokens_per_s": 1e3 * batch / ms["adapted"], "dense_tokens_per_s": 1e3 * batch / ms["dense"]})
    return rows


def layer_shares(engine: DecodeEngine) -> list[dict]:
    """Per layer, the share of its dense QKV and MLP FLOPs the engine spent while counting."""
    shares = []
    for index, block in enumerate(engine.blocks):
        s = block.shape
        dense_qkv, dense_mlp = 2.0 * s.hidden * s.qkv_out, 6.0 * s.hidden * s.intermediate
        shares.append({"layer": index, "qkv_kept": block.qkv_flops_per_token() / dense_qkv,
                       "mlp_kept": block.mlp_part.flops_per_token() / dense_mlp})
    return shares


def section_times(engine: DecodeEngine, context: int, new_tokens: int) -> dict[tuple[int, str], float]:
    """Median ms of each (layer, "qkv" | "attention" | "mlp") section and of the LM head over replays of a graph in
    which timing events sit between the sections: "qkv" is the QKV product, "attention" rotary, attention, the
    output projection and the residual's norm, "mlp" the MLP and its residual's norm."""
    engine.allocate(context + new_tokens + PROFILE_REPLAYS + 8)
    generator = torch.Generator(device=engine.device).manual_seed(4)
    engine.prefill(torch.randint(0, engine.shape.vocab, (context,), device=engine.device, generator=generator))
    marks: list[tuple[int, str, torch.cuda.Event]] = []

    def mark(layer: int, section: str) -> None:
        if torch.cuda.is_current_stream_capturing():  # the warm-up steps before the capture run unmarked
            event = torch.cuda.Event(enable_timing=True, external=True)
            event.record()
            marks.append((layer, section, event))

    engine.marker = mark
    for index, block in enumerate(engine.blocks):
        block.marker = lambda section, index=index: mark(index, section)
    try:
        engine.capture()
    finally:
        engine.marker = None
        for block in engine.blocks:
            block.marker = None
    samples: dict[tuple[int, str], list[float]] = {}
    for _ in range(PROFILE_REPLAYS):
        engine.graph.replay()
        torch.cuda.synchronize()
        for (layer, section, start), (_, _, end) in zip(marks, marks[1:]):
            samples.setdefault((layer, section), []).append(start.elapsed_time(end))
    engine.graph = None  # the timed graph is captured again without events
    return {key: statistics.median(values) for key, values in samples.items()}


LINE_SPAN = 0.2  # kept shares must spread this far for a line through them to say anything


def section_costs(layers: list[dict]) -> dict:
    """Where a run's step goes, from its profiled sections (measure_run's `layers` rows, ms): for "qkv" and "mlp",
    the mean of the layers that keep the section whole and of those cut, and where the cut ones' kept shares of
    their FLOPs spread over LINE_SPAN, a least-squares line ms = fixed_ms + per_kept_ms · kept: the slope is what
    the kept bytes cost, the intercept what a masked section costs whatever it keeps (its extra launches; the
    timing events' own cost sits in every section, whole or cut). "attention_ms": the attention sections' mean.
    Sections the replay did not time (None: a layer run as one persistent launch has no marks inside) are left out."""
    costs = {}
    for kind in ("qkv", "mlp"):
        timed = [row for row in layers if row.get(f"{kind}_ms") is not None]
        whole = [row[f"{kind}_ms"] for row in timed if row[f"{kind}_kept"] >= 1.0]
        cut = [(row[f"{kind}_kept"], row[f"{kind}_ms"]) for row in timed if row[f"{kind}_kept"] < 1.0]
        kept = [k for k, _ in cut]
        entry = {"whole_layers": len(whole), "whole_ms": statistics.fmean(whole) if whole else None,
                 "cut_layers": len(cut), "cut_ms": statistics.fmean(ms for _, ms in cut) if cut else None,
                 "kept_range": (min(kept), max(kept)) if cut else None, "fixed_ms": None, "per_kept_ms": None}
        if cut and max(kept) - min(kept) >= LINE_SPAN:
            slope, intercept = statistics.linear_regression(kept, [ms for _, ms in cut])
            entry.update(fixed_ms=intercept, per_kept_ms=slope)
        costs[kind] = entry
    attention = [row["attention_ms"] for row in layers if row.get("attention_ms") is not None]
    costs["attention_ms"] = statistics.fmean(attention) if attention else None
    return costs
