"""A decode engine for Llama-shaped models in which dense is near the memory-bandwidth floor.

Batch 1, a static KV cache sized for the whole generation, and the whole decode step (embedding, every layer,
the LM head, the greedy pick of the next token, the position update) captured once as a CUDA graph and replayed
per token. The dense and the RaNA model run in the same engine; RaNA's masks are computed inside the graph from
each token's own activations, so they stay input-dependent at every step.

Weights are random (latency depends on shapes and mask densities, not on weight values). RaNA's thresholds are
calibrated on synthetic activations, layer by layer in one pass, so that each adapter keeps its target number of
ranks (neurons) per token on average; the densities actually reached are measured on decode steps.

    engine = DecodeEngine(SHAPES["llama2-7b-shape"], torch.float16, "cuda", flop_reduction=0.44)
    engine.calibrate()
    times_ms = engine.time_decode(context=512, new_tokens=492)
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from rana_core.architecture import Shape
from rana_core.decode.dense_kernels import add_rmsnorm
from rana_core.decode.parts import GEMV_BACKENDS, RMSNorm, _linear, _random, matvec
from rana_core.decode.block import Block, _no_mark, reads_normed_once
from rana_core.decode.residual import PendingNorm, ResidualStream, fuse_norms, sums_from_producers

SHAPES = {
    "llama2-7b-shape": Shape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    "smollm2-135m-shape": Shape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152),
    "tiny-shape": Shape(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=257),
}


def uniform_keeps(shape: Shape, flop_reduction: float) -> tuple[float, float]:
    """(QKV keep, MLP keep) of RaNA's uniform allocation (rana_core.methods.rana): every adapted module cut
    alike, QKV adapted only when every query head has its own K/V head, else the MLPs carry the budget."""
    if shape.kv_heads == shape.heads:
        return 1.0 - flop_reduction, 1.0 - flop_reduction
    qkv, mlp = shape.qkv_out * shape.hidden, 3 * shape.intermediate * shape.hidden
    return 1.0, 1.0 - flop_reduction * (qkv + mlp) / mlp

class DecodeEngine(nn.Module):
    def __init__(self, shape: Shape, dtype=torch.float16, device="cuda", flop_reduction: float = 0.0,
                 seed: int = 0, gemv: str = "triton"):
        super().__init__()
        if gemv not in GEMV_BACKENDS:
            raise ValueError(f"unknown GEMV backend {gemv!r}: use one of {', '.join(GEMV_BACKENDS)}")
        self.gemv = gemv
        self.shape, self.dtype, self.device = shape, dtype, torch.device(device)
        self.flop_reduction = flop_reduction
        generator = torch.Generator(device=self.device).manual_seed(seed)
        keeps = uniform_keeps(shape, flop_reduction)
        self.embed = nn.Parameter(_random((shape.vocab, shape.hidden), 1, dtype, self.device, generator),
                                  requires_grad=False)
        self.blocks = nn.ModuleList(Block(shape, keeps, dtype, self.device, generator, gemv)
                                    for _ in range(shape.layers))
        self.norm = RMSNorm(shape.hidden, dtype, self.device)
        self.lm_head = _linear(shape.vocab, shape.hidden, dtype, self.device, generator)
        self.inv_freq = 1.0 / (10000.0 ** (torch.arange(0, shape.head_dim, 2, device=self.device).float()
                                           / shape.head_dim))
        self.rope_scale = 1.0
        self.max_seq = 0
        self.graph = None
        self.marker = None  # called (layer, section) where each section of a step begins (rana_core.decode.run_latency)
        self.layer_mode = "reference"

    @classmethod
    def assemble(cls, shape: Shape, dtype, device, embed: torch.Tensor, blocks: list, norm: "RMSNorm",
                 lm_head: torch.Tensor, inv_freq: torch.Tensor, rope_scale: float = 1.0,
                 gemv: str = "triton") -> "DecodeEngine":
        """An engine of given parts (rana_core.decode.from_model builds them from a model and its adapters):
        `inv_freq` and `rope_scale` are the model's own rotary frequencies and attention scaling."""
        engine = cls.__new__(cls)
        nn.Module.__init__(engine)
        engine.gemv, engine.shape, engine.dtype, engine.device = gemv, shape, dtype, torch.device(device)
        engine.flop_reduction = None
        engine.embed = nn.Parameter(embed, requires_grad=False)
        engine.blocks = nn.ModuleList(blocks)
        engine.norm = norm
        engine.lm_head = nn.Linear(shape.hidden, shape.vocab, bias=False, device="meta")
        engine.lm_head.weight = nn.Parameter(lm_head, requires_grad=False)
        engine.inv_freq, engine.rope_scale = inv_freq.float().to(engine.device), rope_scale
        engine.max_seq, engine.graph, engine.marker = 0, None, None
        engine.layer_mode = "reference"
        return engine

    LAYER_MODES = ("reference", "persistent", "staged")

    def use_layer_kernels(self, mode: str, config: dict | None = None) -> "DecodeEngine":
        """How a one-token step runs each layer: "reference" (a launch per operation, this module), "persistent"
        (one launch per layer, rana_core.decode.layer_kernel) or "staged" (the same kernel, a launch per stage: the
        persistent kernel's twin, and the only form Triton's interpreter can run). Layers the layer kernel cannot
        run keep the reference path."""
        if mode not in self.LAYER_MODES:
            raise ValueError(f"unknown layer mode {mode!r}: use one of {', '.join(self.LAYER_MODES)}")
        self.layer_mode, self.layer_config = mode, config
        self.graph = None
        if self.max_seq:
            self.allocate(self.max_seq)
        return self

    # --- cache and positions -------------------------------------------------------------------------------
    def allocate(self, max_seq: int) -> None:
        s = self.shape
        self.max_seq = max_seq
        self.k_cache = torch.zeros(s.layers, s.kv_heads, max_seq, s.head_dim, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros_like(self.k_cache)
        angles = torch.outer(torch.arange(max_seq, device=self.device).float(), self.inv_freq)
        self.cos = (angles.cos() * self.rope_scale).to(self.dtype)
        self.sin = (angles.sin() * self.rope_scale).to(self.dtype)
        self.token = torch.zeros(1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph = None
        self.kernels = None
        if self.layer_mode != "reference":
            from rana_core.decode.layer_kernel import layer_kernels

            self.kernels = layer_kernels(self.blocks, max_seq, self.layer_mode, getattr(self, "layer_config", None))
            self.barriers = torch.zeros(s.layers, dtype=torch.int32, device=self.device)
            self.residuals = torch.empty(2, s.hidden, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits of `tokens` (T,) at positions `pos` (T,), reading and filling the cache. The residual stream x
        is updated in place: each residual add is fused with the RMSNorm that follows it."""
        if tokens.numel() == 1 and self.kernels is not None:
            return self._layer_kernel_step(tokens, pos)
        stream = ResidualStream(self.embed[tokens])  # a copy: the residual stream
        allowed = None  # one token attends through decode_attention, which reads its position itself
        if tokens.numel() > 1:
            allowed = torch.arange(self.max_seq, device=self.device)[None, :] <= pos[:, None]
        one_token = tokens.numel() == 1 and self.gemv == "triton"
        fold = one_token and fuse_norms(self.shape.hidden)
        adds = stream if one_token and sums_from_producers() else None  # sections' last GEMVs add the residual

        def normed(owed: PendingNorm, block, section: str):
            """The section's input: the norm left owed to its first GEMV where that GEMV is its only reader."""
            folds = fold or owed.sums is not None
            return owed if folds and reads_normed_once(block, section) else owed.materialize()

        norms = [n for block in self.blocks for n in (block.attn_norm, block.mlp_norm)] + [self.norm]
        mark = self.marker or _no_mark
        owed = PendingNorm(stream, None, norms[0])
        for index, block in enumerate(self.blocks):
            mark(index, "qkv")  # the block marks "attention" once its QKV product is issued
            attended = block.attention(normed(owed, block, "attention"), pos, self.k_cache[index],
                                       self.v_cache[index], self.cos, self.sin, allowed, adds)
            owed = stream.owed(attended, norms[2 * index + 1])
            mark(index, "mlp")
            owed = stream.owed(block.mlp(normed(owed, block, "mlp"), adds), norms[2 * index + 2])
        mark(len(self.blocks), "head")
        logits = matvec(self.lm_head.weight, owed if fold or owed.sums is not None else owed.materialize(),
                        self.gemv)
        mark(len(self.blocks), "end")
        return logits

    def _layer_kernel_step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token through the layer kernels (a layer they cannot run, or one whose masks are being counted or
        calibrated, takes the reference path); the residual alternates between two buffers."""
        x = self.embed[tokens][0]
        self.barriers.zero_()  # one memset per step: every layer's barrier counts from zero
        mark = self.marker or _no_mark
        for index, (block, kernel) in enumerate(zip(self.blocks, self.kernels)):
            mark(index, "layer")  # one launch: its sections cannot be told apart from outside
            measuring = any(getattr(part, "calibrating", False) or getattr(part, "counting", False)
                            for part in block.modules())
            if kernel is None or measuring:
                x = self._reference_layer(block, index, x, pos)
                continue
            out = self.residuals[1] if x.data_ptr() == self.residuals[0].data_ptr() else self.residuals[0]
            x = kernel(x, out, pos, self.k_cache[index], self.v_cache[index], self.cos, self.sin,
                       self.barriers[index:index + 1])
        mark(len(self.blocks), "head")
        normed = torch.empty_like(x)[None]
        add_rmsnorm(x[None], None, self.norm.weight, self.norm.eps, normed)
        logits = matvec(self.lm_head.weight, normed, self.gemv)
        mark(len(self.blocks), "end")
        return logits

    def _reference_layer(self, block, index: int, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token through one layer on the reference path; x (hidden,) is updated in place and returned."""
        x = x[None]
        normed = torch.empty_like(x)
        add_rmsnorm(x, None, block.attn_norm.weight, block.attn_norm.eps, normed)
        attended = block.attention(normed, pos, self.k_cache[index], self.v_cache[index], self.cos, self.sin, None)
        add_rmsnorm(x, attended, block.mlp_norm.weight, block.mlp_norm.eps, normed)
        x += block.mlp(normed)
        return x[0]

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> None:
        """Run the prompt (eagerly) and leave its greedy next token and position in the static inputs."""
        positions = torch.arange(prompt.numel(), device=self.device)
        logits = self(prompt.to(self.device), positions)
        self.token.copy_(logits[-1:].argmax(-1))
        self.pos.fill_(prompt.numel())

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One decode step on the static inputs: the next token and position are written back in place; returns
        the step's logits (in a captured graph, a static tensor that each replay overwrites)."""
        logits = self(self.token, self.pos)
        self.token.copy_(logits.argmax(-1))
        self.pos.add_(1)
        return logits

    # --- RaNA thresholds and densities ----------------------------------------------------------------------
    def adapters(self) -> list[nn.Module]:
        """Every part with a per-token mask (they count their active rows while `counting`)."""
        return [m for m in self.modules() if hasattr(m, "counted_tokens")]

    @torch.no_grad()
    def calibrate(self, tokens: int = 512, seed: int = 1) -> None:
        """Set every threshold from synthetic activations (random tokens through the model, one pass, each
        layer calibrated on what the calibrated layers before it produce)."""
        if not self.adapters():
            return
        self.allocate(max(self.max_seq, tokens))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        prompt = torch.randint(0, self.shape.vocab, (tokens,), device=self.device, generator=generator)
        for adapter in self.adapters():
            adapter.calibrating = True
        try:
            self(prompt, torch.arange(tokens, device=self.device))
        finally:
            for adapter in self.adapters():
                adapter.calibrating = False

    @torch.no_grad()
    def measure_flop_reduction(self, context: int = 64, steps: int = 32, seed: int = 2,
                               prompt: torch.Tensor | None = None) -> float:
        """The QKV+MLP FLOP reduction measured from the masks on eager decode steps after `prompt` (by default
        `context` random tokens)."""
        if self.adapters():  # static parts (dense, static low rank) spend the same on every token
            if prompt is None:
                generator = torch.Generator(device=self.device).manual_seed(seed)
                prompt = torch.randint(0, self.shape.vocab, (context,), device=self.device, generator=generator)
            self.allocate(prompt.numel() + steps + 1)
            self.prefill(prompt)
            with self._counting():
                for _ in range(steps):
                    self.step()
        return self._flop_reduction()

    @torch.no_grad()
    def flop_reduction_on(self, windows: torch.Tensor) -> float:
        """The QKV+MLP FLOP reduction measured from the masks over `windows` (n, seq) of text, each run from an
        empty cache as an evaluation runs it: on a run's held-out windows, what the run measured."""
        with self._counting():
            for window in windows:
                self.allocate(window.numel())
                self(window.to(self.device), torch.arange(window.numel(), device=self.device))
        return self._flop_reduction()

    @contextmanager
    def _counting(self):
        """Every masked part counts its active rows (from zero) for the block."""
        adapters = self.adapters()
        for adapter in adapters:
            adapter.counting, adapter.active_sum, adapter.counted_tokens = True, 0.0, 0
        try:
            yield
        finally:
            for adapter in adapters:
                adapter.counting = False

    def _flop_reduction(self) -> float:
        """1 − the QKV+MLP FLOPs spent at the densities last counted over their dense FLOPs."""
        spent = sum(block.flops_per_token() for block in self.blocks)
        return 1.0 - spent / sum(block.dense_flops_per_token() for block in self.blocks)

    # --- timing ---------------------------------------------------------------------------------------------
    def capture(self) -> None:
        """Capture one decode step as a CUDA graph (capture_step)."""
        capture_step(self)

    @torch.no_grad()
    def time_decode(self, context: int, new_tokens: int, seed: int = 3) -> list[float]:
        """Milliseconds of each of `new_tokens` graph-replayed decode steps after a random prompt of `context`."""
        self.allocate(context + new_tokens + 8)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        self.prefill(torch.randint(0, self.shape.vocab, (context,), device=self.device, generator=generator))
        self.capture()
        return replay_times(self.graph, new_tokens)

    def weight_bytes_per_token(self) -> float:
        """Bytes of weights one decode step must read: every dense matrix, and for adapters B plus the rows of
        their active ranks (neurons) at the densities last counted."""
        element = torch.finfo(self.dtype).bits // 8
        total = self.lm_head.weight.numel() + self.shape.hidden  # the LM head and one embedding row
        return (total + sum(block.weight_elements_per_token() for block in self.blocks)) * element

    def kv_bytes_per_token(self, context: int, new_tokens: int) -> float:
        """Mean bytes of K and V a step must read (the prefix so far), over the generated tokens."""
        mean_prefix = context + (new_tokens + 1) / 2
        features = sum(block.kv_features() for block in self.blocks)
        return features * mean_prefix * (torch.finfo(self.dtype).bits // 8)


def capture_step(decoder) -> None:
    """decoder.graph ← one decoder.step() captured as a CUDA graph (after warm-up steps on a side stream, as graphs
    require), its logits in decoder.graph_logits; the static token and position left where they were. Serves the
    engine and the batched decoder (batch_step.py) alike."""
    token, pos = decoder.token.clone(), decoder.pos.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            decoder.step()
    torch.cuda.current_stream().wait_stream(stream)
    decoder.graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(decoder.graph):
        decoder.graph_logits = decoder.step()
    decoder.token.copy_(token)  # warm-up and capture advanced the state: start again where the prompt left it
    decoder.pos.copy_(pos)


def replay_times(graph, steps: int) -> list[float]:
    """Milliseconds of each of `steps` replays of `graph`, timed by CUDA events."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    for start, end in zip(starts, ends):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]
