"""B sequences decoding together through a DecodeEngine's weights: one step makes one token for each.

At batch 1 the engine (engine.py) reads every weight once per token; with B sequences a step reads each weight
once for B tokens, so a dense step costs little more than at batch 1 until the products turn compute-bound. A
masked product has no such luck: each token has its own mask, and the step must read every row that *any* token
activates (batch_masked.py: the union of the masks, each row read once and used by all B tokens). How much of the
batch-1 saving survives the union is what users of activation-sparsity kernels ask first; bench/batch_decode.py
measures it.

Each sequence has its own KV cache and position (they may differ: prompts of different lengths), the whole step
is one CUDA graph per batch size, and the greedy next token of every sequence is written back in place, as in
the engine. Dense products are one matrix product for the B rows (cuBLAS, or with products="triton"
batch_gemv.rows_product, which streams each weight once like the batch-1 GEMV), each residual add and the RMSNorm
after it one fused kernel for the B rows, and rotary, the cache writes and attention the engine's fused kernels
with a sequence axis (batch_kernels.py: each sequence's cache read up to its own position). Masked products
read every row, each token's mask applied to its coefficients (masked="dense", the default), or only the union
of the masks (masked="union"). On the H200 the union of even 1-8 tokens' masks keeps so many rows that reading
all of them in order is faster at every batch (bench/batch_decode.py: RaNA −44% on the 7B shape at 0.93-0.96×
dense with every row, 0.49-0.69× with the union). The synthetic engine's blocks (dense, RaNA) and those of an
engine built from a stored run (rana_core.decode.from_model: dense, svd, RaNA, CATS, TEAL, WINA, hybrid's mixes,
q/k/v biases) decode in batches, each part through the batched product its kind calls for; A3's narrower
attention and Gemma's layer are refused in one line.

    batch = BatchDecoder(engine, batch=8, max_seq=1024)
    batch.prefill([prompt_a, prompt_b, ...])    # each through the engine, its cache copied in
    times_ms = batch.time_decode(new_tokens=128)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rana_core.decode.batch_gemv import rows_product
from rana_core.decode.batch_masked import MAX_BATCH, masked_rows_dense, masked_rows_union
from rana_core.decode.batch_kernels import batch_decode_attention, batch_rope_into_cache
from rana_core.decode.dense_kernels import add_rmsnorm
from rana_core.decode.block import Block
from rana_core.decode.engine import DecodeEngine, capture_step, replay_times
from rana_core.decode.from_model import CatsPart, Dense, ModelBlock, ProjectionMLP, StaticLowRank
from rana_core.decode.narrow import A3AttentionPart
from rana_core.decode.parts import NeuronPart, RankPart


def unsupported(engine: DecodeEngine) -> str | None:
    """Why the batched step cannot run this engine's blocks (one line), or None when it can."""
    if type(engine) is not DecodeEngine:
        return f"{type(engine).__name__}'s layers do not decode in batches yet (Llama-style layers do)"
    for block in engine.blocks:
        if isinstance(block.qkv, A3AttentionPart):
            return "A3's narrower attention and cache do not decode in batches yet"
        if type(block) not in (Block, ModelBlock):
            return f"a {type(block).__name__} layer does not decode in batches yet"
    return None


def union_product(part: RankPart, coeff: torch.Tensor) -> torch.Tensor:
    """A masked part's output for B tokens' coefficients (B, K), in their dtype: each token's own mask, the rows
    of the union read once (batch_masked.masked_rows_union)."""
    y, _ = masked_rows_union(part.rows, coeff.contiguous(), part.threshold, part.scale)
    return y.to(coeff.dtype)


def dense_masked_product(part: RankPart, coeff: torch.Tensor) -> torch.Tensor:
    """The same output from every row, each token's mask applied to its coefficients (batch_masked.
    masked_rows_dense): no list. Once the union of a few tokens' masks keeps most rows, this reads little more
    and streams the rows in order (bench/masked_batch.py)."""
    return masked_rows_dense(part.rows, coeff, part.threshold, part.scale)


class BatchDecoder:
    """B sequences through `engine`'s blocks, one token each per step (module docstring)."""

    PRODUCTS = {"cublas": F.linear, "triton": lambda x, weight: rows_product(weight, x)}
    MASKED = {"union": union_product, "dense": dense_masked_product}

    def __init__(self, engine: DecodeEngine, batch: int, max_seq: int, products: str = "cublas",
                 masked: str = "dense"):
        reason = unsupported(engine)
        if reason:
            raise ValueError(reason)
        if products not in self.PRODUCTS:
            raise ValueError(f"unknown products {products!r}: use one of {', '.join(self.PRODUCTS)}")
        if masked not in self.MASKED:
            raise ValueError(f"unknown masked products {masked!r}: use one of {', '.join(self.MASKED)}")
        self.product, self.masked = self.PRODUCTS[products], self.MASKED[masked]
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"a batch of {batch} sequences: the masked products take 1 to {MAX_BATCH}")
        s = engine.shape
        self.engine, self.batch, self.max_seq = engine, batch, max_seq
        self.k_cache = torch.zeros(s.layers, batch, s.kv_heads, max_seq, s.head_dim, dtype=engine.dtype,
                                   device=engine.device)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.token = torch.zeros(batch, dtype=torch.long, device=engine.device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=engine.device)
        self.graph = None

    @torch.no_grad()
    def prefill(self, prompts: list[torch.Tensor]) -> None:
        """Each prompt through the batch-1 engine (its cache copied into this sequence's), leaving every
        sequence's greedy next token and position in the static inputs."""
        if len(prompts) != self.batch:
            raise ValueError(f"{len(prompts)} prompts for a batch of {self.batch}")
        if max(p.numel() for p in prompts) >= self.max_seq:
            raise ValueError(f"a prompt of {max(p.numel() for p in prompts)} tokens leaves no room in a cache of "
                             f"{self.max_seq}")
        engine = self.engine
        engine.allocate(self.max_seq)
        for b, prompt in enumerate(prompts):
            engine.prefill(prompt)
            self.k_cache[:, b].copy_(engine.k_cache)
            self.v_cache[:, b].copy_(engine.v_cache)
            self.token[b], self.pos[b] = engine.token[0], engine.pos[0]
        self.cos, self.sin = engine.cos, engine.sin
        self.graph = None

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) of one token per sequence at its own position, each written into its cache."""
        engine, s = self.engine, self.engine.shape
        B = tokens.shape[0]
        x = engine.embed[tokens]  # a copy: the residual stream, updated in place by the fused add + norm
        normed = torch.empty_like(x)
        norms = [n for block in engine.blocks for n in (block.attn_norm, block.mlp_norm)] + [engine.norm]
        add_rmsnorm(x, None, norms[0].weight, norms[0].eps, normed)
        for index, block in enumerate(engine.blocks):
            qkv = self.part(block.qkv, normed)
            if block.qkv_bias is not None:
                qkv = qkv + block.qkv_bias
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            q = batch_rope_into_cache(qkv, self.cos, self.sin, pos, k_cache, v_cache, s.heads)
            attended = batch_decode_attention(q, k_cache, v_cache, pos)  # each over its own prefix
            after = norms[2 * index + 1]
            add_rmsnorm(x, self.product(attended.reshape(B, s.hidden), block.wo.weight), after.weight, after.eps,
                        normed)
            after = norms[2 * index + 2]
            add_rmsnorm(x, self.mlp(block, normed), after.weight, after.eps, normed)
        return self.product(normed, engine.lm_head.weight)

    def part(self, part: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One product of a layer for the B rows of x, through the batched product its kind calls for."""
        if isinstance(part, NeuronPart):  # the coefficients are the inputs themselves (RaNA's down, TEAL, WINA)
            return self.masked(part, x)
        if isinstance(part, RankPart):  # z = B x for every rank, then the masked A-part
            return self.masked(part, self.product(x, part.B))
        if isinstance(part, StaticLowRank):
            return self.product(self.product(x, part.B), part.A)
        if isinstance(part, (nn.Linear, Dense)):
            return self.product(x, part.weight)
        raise TypeError(f"no batched product for a {type(part).__name__}")  # unsupported() keeps these out

    def mlp(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        """The MLP of one layer for the B rows of x: gate and up read in one product where they share one."""
        parts = block.mlp_part if isinstance(block, ModelBlock) else block
        if isinstance(parts, CatsPart):  # a dense gate decides the neurons: its own batched PyTorch forward
            return parts(x)
        if hasattr(parts, "gate_up_B"):  # RaNA: gate's and up's B in one product, masked A-parts, masked down
            z = self.product(x, parts.gate_up_B)
            up = getattr(parts, "rank", parts.gate.rank)  # where up's coefficients start (RanaMLP pads gate's)
            gate = self.masked(parts.gate, z[:, : parts.gate.rank])
            act = getattr(parts, "act", F.silu)
            return self.part(parts.down, act(gate) * self.masked(parts.up, z[:, up: up + parts.up.rank]))
        fused = parts.fused if isinstance(parts, ProjectionMLP) else parts.gate_up
        if fused is not None:  # SwiGLU with dense gate and up, stacked
            gate, up = self.product(x, fused).chunk(2, dim=-1)
            return self.part(parts.down, F.silu(gate) * up)
        return self.part(parts.down, parts.act(self.part(parts.gate, x)) * self.part(parts.up, x))

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One step on the static inputs: every sequence's next token and position written back in place."""
        logits = self.forward(self.token, self.pos)
        self.token.copy_(logits.argmax(-1))
        self.pos.add_(1)
        return logits

    def capture(self) -> None:
        """The step as one CUDA graph, replayed from where prefill left (engine.capture_step)."""
        capture_step(self)

    def time_decode(self, new_tokens: int) -> list[float]:
        """Milliseconds of each of `new_tokens` graph-replayed steps (each makes `batch` tokens)."""
        if int(self.pos.max()) + new_tokens + 3 >= self.max_seq:
            raise ValueError(f"{new_tokens} new tokens after the prompts overflow a cache of {self.max_seq}")
        self.capture()
        return replay_times(self.graph, new_tokens)
