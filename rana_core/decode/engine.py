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
import torch.nn.functional as F
from torch import nn

from rana_core.architecture import Shape
from rana_core.decode import masked_wide
from rana_core.decode.attention_kernels import rope_attention
from rana_core.decode.dense_kernels import add_rmsnorm, rotate_half_reference
from rana_core.decode.masked_kernels import masked_rows_partials
from rana_core.decode.parts import (GEMV_BACKENDS, NeuronPart, RankPart, RMSNorm, _join, _linear, _random,
                                    masked_gemv, matvec, swiglu_chain)
from rana_core.decode.residual import PendingNorm, ResidualStream, fuse_norms

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

class Block(nn.Module):
    def __init__(self, shape: Shape, keeps: tuple[float, float], dtype, device, generator, gemv: str):
        super().__init__()
        self.shape, self.gemv = shape, gemv
        self.qkv_bias = None  # q/k/v biases, stacked, where a model has them (a block built from it)
        self.marker = None
        h, i = shape.hidden, shape.intermediate
        qkv_keep, mlp_keep = keeps
        self.attn_norm, self.mlp_norm = RMSNorm(h, dtype, device), RMSNorm(h, dtype, device)
        if qkv_keep < 1.0:
            self.qkv = RankPart(shape.qkv_out, h, qkv_keep, dtype, device, generator)
        else:
            self.qkv = _linear(shape.qkv_out, h, dtype, device, generator)
        if mlp_keep < 1.0:
            self.gate = RankPart(i, h, mlp_keep, dtype, device, generator)
            self.up = RankPart(i, h, mlp_keep, dtype, device, generator)
            self.down = NeuronPart(h, i, mlp_keep, dtype, device, generator)
            # gate's and up's B in one matrix (one product reads both), their A-rows and thresholds likewise (one
            # masked launch serves both, as two groups): from now on the parts hold views into the joint tensors
            self.gate_up_B = _join(self.gate, self.up, "B")
            self.gate_up_rows = _join(self.gate, self.up, "rows")
            self.gate_up_threshold = _join(self.gate, self.up, "threshold")
        else:
            self.gate, self.up = _linear(i, h, dtype, device, generator), _linear(i, h, dtype, device, generator)
            self.gate_up = _join(self.gate, self.up, "weight")  # one product reads both, as above
            self.down = _linear(h, i, dtype, device, generator)
        self.wo = _linear(h, h, dtype, device, generator)

    def attention(self, normed, pos, k_cache, v_cache, cos_table, sin_table, allowed):
        """o_proj(attention(normed)), this token's k and v written into the cache."""
        s = self.shape
        T, hd = normed.shape[0], s.head_dim
        qkv, splits = self.qkv_product(normed)
        if T == 1:  # rotary and both cache writes, then attention over the prefix only (1 to 3 launches)
            attended = rope_attention(qkv, cos_table, sin_table, pos, k_cache, v_cache, s.heads, s.kv_heads,
                                      torch.empty(s.heads, hd, dtype=normed.dtype, device=normed.device),
                                      splits).view(1, s.hidden)
        else:
            q, k, v = qkv.split([s.heads * hd, s.kv_heads * hd, s.kv_heads * hd], dim=-1)
            cos, sin = cos_table[pos], sin_table[pos]
            q = rotate_half_reference(q.view(T, s.heads, hd), cos, sin).transpose(0, 1)
            k_cache.index_copy_(1, pos, rotate_half_reference(k.view(T, s.kv_heads, hd), cos, sin).transpose(0, 1))
            v_cache.index_copy_(1, pos, v.view(T, s.kv_heads, hd).transpose(0, 1))
            attended = F.scaled_dot_product_attention(q[None], k_cache[None], v_cache[None],
                                                      attn_mask=allowed[None, None], enable_gqa=s.kv_heads != s.heads)
            attended = attended[0].transpose(0, 1).reshape(T, s.hidden)
        return matvec(self.wo.weight, attended, self.gemv)

    def mlp(self, normed):
        if not isinstance(self.gate, RankPart):
            return matvec(self.down.weight, matvec(self.gate_up, normed, self.gemv, swiglu=True), self.gemv)
        z = matvec(self.gate_up_B, normed, self.gemv)
        if self.gate.fusable(z) and self.down.fusable(z):
            # one token: gate's and up's masked products in one launch; their partial sums go straight into the
            # down product's compaction, which makes h = silu(gate)·up itself (no reduction launch between)
            return swiglu_chain(self.gate_up_rows, z[0], self.gate_up_threshold, self.down,
                                torch.empty_like(self.gate.out))
        h = F.silu(self.gate.expand(z[:, : self.gate.rank])) * self.up.expand(z[:, self.gate.rank:])
        return self.down(h)

    def qkv_product(self, normed: torch.Tensor, fuse: bool = True) -> tuple[torch.Tensor, int]:
        """(qkv, splits): the stacked q/k/v of `normed`, biases added. With `fuse`, one token through a rank part
        leaves the masked product's partial sums instead (splits > 0), which the rotary kernel adds up."""
        splits = 0
        if isinstance(self.qkv, RankPart) and not isinstance(self.qkv, NeuronPart):  # B, then the masked A-part
            z = matvec(self.qkv.B, normed, self.gemv)
            if fuse and self.qkv.fusable(z) and self.qkv_bias is None:
                if masked_wide.product_design(self.qkv.rows) == "gemv":
                    qkv = masked_gemv(self.qkv.rows, z, self.qkv.threshold, self.qkv.scale)
                else:
                    qkv, splits = masked_rows_partials(self.qkv.rows, z[0], self.qkv.threshold, self.qkv.scale)
            else:
                qkv = self.qkv.expand(z)
        elif isinstance(self.qkv, nn.Linear):
            qkv = matvec(self.qkv.weight, normed, self.gemv)
        elif isinstance(self.qkv, NeuronPart) and fuse and self.qkv.fusable(normed) and self.qkv_bias is None:
            # TEAL's or WINA's input mask: the normed input is the coefficients; partial sums as above, or one GEMV
            # over every row that may make the norm itself (reads_normed_once)
            if masked_wide.product_design(self.qkv.rows) == "gemv":
                qkv = masked_gemv(self.qkv.rows, normed, self.qkv.threshold, self.qkv.scale)
            else:
                qkv, splits = masked_rows_partials(self.qkv.rows, normed[0], self.qkv.threshold, self.qkv.scale)
        else:  # another part of a block built from a model (a static low rank, masked inputs with a bias)
            qkv = self.qkv(normed)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        self.mark("attention")
        return qkv, splits

    def mark(self, section: str) -> None:
        """Where a section of this layer begins, for a profiled replay (rana_core.decode.run_latency)."""
        if self.marker is not None:
            self.marker(section)

    def flops_per_token(self) -> float:
        """QKV and MLP FLOPs of one token, at the densities counted (rana_core.flops counts the same modules)."""
        return sum(m.flops_per_token() if isinstance(m, RankPart) else 2.0 * m.weight.numel()
                   for m in (self.qkv, self.gate, self.up, self.down))

    def dense_flops_per_token(self) -> float:
        return 2.0 * self.shape.hidden * (self.shape.qkv_out + 3 * self.shape.intermediate)

    def weight_elements_per_token(self) -> float:
        return sum(m.elements_per_token() if isinstance(m, RankPart) else m.weight.numel()
                   for m in (self.qkv, self.gate, self.up, self.down, self.wo))

    def kv_features(self) -> int:
        """Key and value features cached per token (A3's narrower heads cache fewer)."""
        return 2 * self.shape.kv_heads * self.shape.head_dim


def _no_mark(layer: int, section: str) -> None:
    pass


def reads_normed_once(block, section: str) -> bool:
    """Whether a section's normed input is read by one GEMV only, which can then make the residual add and the
    norm itself (residual.PendingNorm): the stacked QKV or RaNA's B for "attention" (TEAL's or WINA's input mask
    only as one GEMV over every row, masked_wide.product_design; not svd's or A3's parts), the stacked gate/up
    (dense SwiGLU, RaNA's B, or masked gate/up as such a GEMV) for "mlp" (not CATS or mixed MLPs)."""
    if section == "attention":
        qkv = block.qkv
        if isinstance(qkv, NeuronPart):  # an input mask: only its GEMV over every row makes the norm itself
            return (block.qkv_bias is None and not (qkv.calibrating or qkv.counting)
                    and masked_wide.product_design(qkv.rows) == "gemv")
        return isinstance(qkv, nn.Linear) or isinstance(qkv, RankPart)
    mlp = getattr(block, "mlp_part", None)  # a block built from a model keeps its MLP as a part
    if mlp is None:  # the synthetic block: dense SwiGLU or RaNA, each starting with one GEMV of stacked weights
        return True
    return (hasattr(mlp, "gate_up_B") or getattr(mlp, "fused", None) is not None
            or bool(getattr(mlp, "reads_pending", lambda: False)()))


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
        fold = tokens.numel() == 1 and self.gemv == "triton" and fuse_norms(self.shape.hidden)

        def normed(owed: PendingNorm, block, section: str):
            """The section's input: the norm left owed to its first GEMV where that GEMV is its only reader."""
            return owed if fold and reads_normed_once(block, section) else owed.materialize()

        norms = [n for block in self.blocks for n in (block.attn_norm, block.mlp_norm)] + [self.norm]
        mark = self.marker or _no_mark
        owed = PendingNorm(stream, None, norms[0])
        for index, block in enumerate(self.blocks):
            mark(index, "qkv")  # the block marks "attention" once its QKV product is issued
            attended = block.attention(normed(owed, block, "attention"), pos, self.k_cache[index],
                                       self.v_cache[index], self.cos, self.sin, allowed)
            owed = PendingNorm(stream, attended, norms[2 * index + 1])
            mark(index, "mlp")
            owed = PendingNorm(stream, block.mlp(normed(owed, block, "mlp")), norms[2 * index + 2])
        mark(len(self.blocks), "head")
        logits = matvec(self.lm_head.weight, owed if fold else owed.materialize(), self.gemv)
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
