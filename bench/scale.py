"""How long a compression takes at 7B scale on one GPU, stage by stage, and how much GPU memory it holds.

    python bench/scale.py --build-7b /tmp/llama7b --tokenizer TOKENIZER_FOLDER     # once per machine (13 GiB)
    python bench/scale.py --model /tmp/llama7b [--methods svd,cats,rana,rana-greedy,a3,hybrid,hybrid-warm]
                          [--budget 0.44] [--calib-tokens 8192] [--eval-tokens 8192] [--layer-by-layer|--no-...]
    python bench/scale.py --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf --label smollm2-135m   # real weights

The 7B model is Llama-2-7B's shape (hidden 4096, 32 layers, 32 heads, MLP 11008) with random bf16 weights and the
vocabulary of the tokenizer it is given (SmolLM2's: 49,152 tokens, 6.9 B parameters), saved as safetensors; build
it on the GPU machine itself (too large to carry). Each method runs `rana_core.pipeline.compress` on the loaded
model with every cached result of the previous method dropped, so it computes everything but the load; "hybrid-warm"
runs hybrid again on the curves "hybrid" left in the cache folder. Seconds per stage come from the progress
messages: data, dense eval, build (split into the calibration pass and the rest), thresholds, adapted eval.
Prints a table and adds one entry per (label, method) to bench/results/scale-<device>.json.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "rope_theta": 10000.0, "tie_word_embeddings": False}
METHODS = {"svd": ("svd", "uniform"), "cats": ("cats", "uniform"), "rana": ("rana", "uniform"),
           "rana-greedy": ("rana", "greedy"), "a3": ("a3", "uniform"), "hybrid": ("hybrid", "exact-loss"),
           "hybrid-warm": ("hybrid", "exact-loss")}
GIB = 1 << 30
STAGES = ("load", "data", "dense eval", "build", "thresholds", "adapted eval")


def build_7b(folder: Path, tokenizer_folder: Path, seed: int = 0) -> None:
    """A Llama-2-7B-shaped model with random bf16 weights (made on the GPU, where 6.9 B draws take a second)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **LLAMA2_7B)
    torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    print(f"built {folder}: {params / 1e9:.2f} B parameters in {time.perf_counter() - started:.0f} s")


class StageClock:
    """Seconds per stage from the pipeline's "stage: message" progress lines; the calibration pass inside
    "build" (messages "build: calibration …") is its own stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.current, self.since = None, time.perf_counter()

    def __call__(self, fraction: float, message: str) -> None:
        stage = message.partition(":")[0] if ":" in message else message
        if stage not in STAGES:  # the closing summary line
            return
        if stage == "build":
            stage = "calibration" if "calibration" in message.partition(":")[2][:14] else "build"
        if stage != self.current:
            self._close()
            self.current = stage
        self.last_message = message

    def _close(self) -> None:
        now = time.perf_counter()
        if self.current is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.since
        self.since = now

    def finish(self) -> dict[str, float]:
        self._close()
        self.current = None
        return {stage: round(value, 1) for stage, value in self.seconds.items()}


def measure(loaded, label: str, name: str, args, cache_dir: Path) -> dict:
    from rana_core.config import CompressConfig
    from rana_core.pipeline import compress

    method, allocation = METHODS[name]
    config = CompressConfig(model=args.model, method=method, allocation=allocation, flop_reduction=args.budget,
                            calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens, seq_len=args.seq_len,
                            device=args.device, dtype=args.dtype, layer_by_layer=args.layer_by_layer,
                            track_layers=False)
    loaded.cache.clear()  # each method computes everything but the load
    _reset_peak()
    clock = StageClock()
    started = time.perf_counter()
    profiler = cProfile.Profile() if args.profile else None

    def out_of_time(_signum, _frame):
        raise TimeoutError(f"over {args.method_timeout} s, at '{getattr(clock, 'last_message', '')}'")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(args.method_timeout or 0)
    try:
        if profiler:
            profiler.enable()
        result = compress(config, progress=clock, loaded=loaded, cache_dir=cache_dir)
        outcome = {"perplexity": round(result.perplexity, 3), "dense_perplexity": round(result.dense_perplexity, 3),
                   "measured_flop_reduction": round(result.measured_flop_reduction, 4)}
    except Exception as exc:  # a failed method is a row of the table, not the end of the bench
        outcome = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    finally:
        signal.alarm(0)
        if profiler:
            profiler.disable()
            args.profile.mkdir(parents=True, exist_ok=True)
            with open(args.profile / f"{label}-{name}.txt", "w") as handle:
                pstats.Stats(profiler, stream=handle).sort_stats("cumulative").print_stats(40)
    seconds = time.perf_counter() - started
    return {"label": label, "method": name, "budget": args.budget, "seconds": round(seconds, 1),
            "stages": clock.finish(), **_peaks(),
            "layer_by_layer": loaded.info["layer_by_layer"], **outcome}


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peaks() -> dict:
    if not torch.cuda.is_available():
        return {"peak_gpu_gib": None}
    return {"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
            "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2)}


def _store(path: Path, device: str, rows: list[dict]) -> None:
    stored = json.loads(path.read_text()) if path.is_file() else {"device": device, "runs": []}
    new = {(row["label"], row["method"]) for row in rows}
    stored["runs"] = [row for row in stored["runs"] if (row["label"], row["method"]) not in new] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-7b", type=Path, metavar="FOLDER")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder for --build-7b")
    parser.add_argument("--model", help="a model folder, .gguf file or bundled name")
    parser.add_argument("--label", help="the model's name in the results (default: the folder's name)")
    parser.add_argument("--methods", default="svd,cats,rana,rana-greedy,a3,hybrid,hybrid-warm")
    parser.add_argument("--budget", type=float, default=0.44)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layer-by-layer", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--method-timeout", type=int, help="stop a method after this many seconds (a row says where)")
    parser.add_argument("--profile", type=Path, metavar="FOLDER", help="write each method's cProfile summary here")
    args = parser.parse_args(argv)
    if args.build_7b:
        build_7b(args.build_7b, args.tokenizer)
    if not args.model:
        return 0
    from rana_core.loading import load_model

    label = args.label or Path(args.model).name
    _reset_peak()
    started = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, layer_by_layer=args.layer_by_layer)
    load = {"label": label, "method": "(load)", "seconds": round(time.perf_counter() - started, 1),
            "parameters": loaded.info["parameters"], "layer_by_layer": loaded.info["layer_by_layer"],
            **_peaks()}
    rows = [load]
    print(f"{label}: {loaded.info['parameters'] / 1e9:.2f} B parameters loaded in {load['seconds']} s", flush=True)
    cache_dir = Path(tempfile.mkdtemp(prefix="scale-curves-"))
    device = torch.cuda.get_device_name().replace(" ", "-").lower() if torch.cuda.is_available() else "cpu"
    path = RESULTS / f"scale-{device}.json"
    for name in args.methods.split(","):
        rows.append(measure(loaded, label, name, args, cache_dir))
        print(json.dumps(rows[-1]), flush=True)
        _store(path, device, rows)  # after each method: a long bench cut off keeps what it measured
    print(f"\n{'method':<12} {'total s':>8} {'peak GiB':>8}  stages (s)")
    for row in rows:
        stages = " ".join(f"{k} {v}" for k, v in row.get("stages", {}).items())
        print(f"{row['method']:<12} {row['seconds']:>8} {str(row['peak_gpu_gib']):>8}  {stages} {row.get('error', '')}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
