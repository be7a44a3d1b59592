"""One kernel per decoder layer at batch 1: a layer's products, norms, rotary, attention and masked products run
as stages of one persistent Triton launch, separated by grid-wide barriers instead of kernel launches.

Why: at batch 1 the reference engine (``engine.py``) runs a layer as a chain of launches (dense 9, RaNA 15), and
each launch on the critical path costs a few microseconds of ramp-up and drain beside the bytes it moves;
a masked product's compaction, gather and reduction are three of them. Here every program of the launch stays
resident (as many as the GPU holds at once, ``resident_per_sm``) and walks the same stage list; between two
stages each program arrives at a counter in global memory and waits until all have (``layer_stages.next_phase``):

1. norm → first product: every program computes the RMSNorm of the residual itself (a few KB from L2) and
   streams its tiles of the dense QKV weight, or of the rank adapter's B;
2. masked A-part (rank adapters): the active ranks compacted into a list (the reference's compaction, chunk by
   chunk), then the list split evenly over (output columns × share) items that stream full tiles of listed rows
   (``masked_kernels.compact_chunk`` and ``gather_share``, shared with the reference engine); the shares'
   partial sums are added by the next stage;
3. rotary + cache write, 4. attention over the prefix in chunks, 5. the chunks' softmaxes combined;
6. o_proj, with the residual add in its epilogue (each program owns whole output rows);
7. norm → gate/up (dense with SwiGLU fused, or both B factors), 8-9. their masked A-parts, listed and gathered;
10. the neuron adapter's compaction makes h = silu(gate)·up from those partial sums and lists its active
    neurons, 11. their rows of W_downᵀ gathered (or a dense down with the residual add fused), 12. the sum added
    to the residual.

The same kernel runs *staged* (``PERSISTENT=False``: one launch per stage, no barrier): on the CPU that is the
only way (Triton's interpreter runs programs one after another, so a grid barrier would wait forever), and on a
GPU it is the twin the persistent launch is tested against. Data produced inside the launch is read with
``.cg`` loads (L2, never a stale L1 line) and every stage writes its own buffer. The stages themselves are in
``layer_stages.py``.

Blocks it cannot run (biases, TEAL/WINA masks on QKV or the MLP input, static low rank, A3, Gemma) keep the
reference path, layer by layer (``supports``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rana_core.decode.launch import interpreting, triton

if triton is not None:
    import triton.language as tl

    from rana_core.decode.layer_stages import (_now, attention_stage, combine_stage, compact_stage, gather_stage,
                                               gemv_stage, inverse_rms, next_phase,
                                               normed_compact_stage, residual_stage, rope_stage)

    @triton.jit
    def _layer_kernel(x_ptr, mid_ptr, out_ptr, attn_norm_ptr, mlp_norm_ptr, eps,
                      qkv_w_ptr, qkv_rows_ptr, qkv_scale_ptr, qkv_threshold_ptr, z_qkv_ptr, qkv_index_ptr,
                      qkv_value_ptr, qkv_count_ptr, qkv_partial_ptr,
                      cos_ptr, sin_ptr, pos_ptr, q_ptr, k_cache_ptr, v_cache_ptr, max_seq, scale,
                      m_ptr, l_ptr, acc_ptr, attended_ptr, wo_ptr,
                      gu_w_ptr, z_gu_ptr, gate_rows_ptr, gate_scale_ptr, gate_threshold_ptr, gate_index_ptr,
                      gate_value_ptr, gate_count_ptr, up_rows_ptr, up_scale_ptr, up_threshold_ptr, up_index_ptr,
                      up_value_ptr, up_count_ptr,
                      gu_partial_ptr, h_ptr,
                      down_ptr, down_scale_ptr, down_threshold_ptr, down_index_ptr, down_value_ptr, down_count_ptr,
                      down_partial_ptr, bar_ptr, clock_ptr,
                      H: tl.constexpr, I: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                      D: tl.constexpr, QKV_MODE: tl.constexpr, QKV_RANK: tl.constexpr, QKV_SCALED: tl.constexpr,
                      MLP_MODE: tl.constexpr, GATE_RANK: tl.constexpr, UP_RANK: tl.constexpr,
                      GU_SCALED: tl.constexpr, DOWN_SCALED: tl.constexpr, MAX_CHUNKS: tl.constexpr,
                      CHUNKS_P2: tl.constexpr, CHUNK: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QKV_LIST: tl.constexpr, GATE_LIST: tl.constexpr,
                      UP_LIST: tl.constexpr, DOWN_LIST: tl.constexpr, QKV_SPLITS: tl.constexpr, GU_SPLITS: tl.constexpr,
                      DOWN_SPLITS: tl.constexpr, GATHER_K: tl.constexpr, BLOCK_M: tl.constexpr,
                      GEMV_FLAT: tl.constexpr, LOAD_POLL: tl.constexpr, CLOCK: tl.constexpr,
                      INTERPRET: tl.constexpr, PERSISTENT: tl.constexpr, STAGE: tl.constexpr):
        """One decoder layer for one token (module docstring). Persistent: every stage, a grid barrier between
        two; staged: stage STAGE only (the host launches them in order). *_LIST: the compaction chunk of each
        masked product; *_SPLITS: how many shares its list is split into (gate's and up's alike: down's
        compaction reads their partial sums as one block, gate's rows first). *_MODE: 0 dense, 1 rank adapters
        (RaNA: QKV's, or gate's and up's with the neuron adapter on down), 2 input masks (TEAL, WINA: every input
        of the module masked); *_RANK: the rows of a masked product's list (the rank, or the input size)."""
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        pos = tl.load(pos_ptr)
        QKV_OUT: tl.constexpr = (HEADS + 2 * KV_HEADS) * D
        phase = 0
        if CLOCK and PERSISTENT:
            if pid == 0:
                tl.store(clock_ptr, _now())
        # 1. RMSNorm → the dense QKV product or the rank adapter's B; or (input masks) the normed input listed
        if PERSISTENT or STAGE == 0:
            if QKV_MODE == 2:
                normed_compact_stage(x_ptr, attn_norm_ptr, eps, z_qkv_ptr, qkv_scale_ptr, qkv_threshold_ptr,
                                     qkv_index_ptr, qkv_value_ptr, qkv_count_ptr, pid, programs, H, BLOCK_H,
                                     QKV_SCALED, QKV_LIST)
            else:
                inv_rms = inverse_rms(x_ptr, eps, H, BLOCK_H)
                gemv_stage(qkv_w_ptr, x_ptr, attn_norm_ptr, inv_rms, z_qkv_ptr, x_ptr, pid, programs,
                           QKV_RANK if QKV_MODE == 1 else QKV_OUT, H, True, 0, BLOCK_N, BLOCK_K, GEMV_FLAT, INTERPRET)
        phase = next_phase(bar_ptr, clock_ptr, phase, pid, programs, PERSISTENT, LOAD_POLL, CLOCK)
        # 2. a masked QKV product: the rank adapter's active ranks listed, then the list's rows gathered
        if QKV_MODE == 1:
            if PERSISTENT or STAGE == 1:
                compact_stage(z_qkv_ptr, z_qkv_ptr, qkv_threshold_ptr, qkv_index_ptr, qkv_value_ptr, qkv_count_ptr,
                              z_qkv_ptr, pid, programs, QKV_RANK, 1, False, QKV_LIST, 0)
            phase = next_phase(bar_ptr, clock_ptr, phase, pid, programs, PERSISTENT, LOAD_POLL, CLOCK)
        if QKV_MODE > 0:
            if PERSISTENT or STAGE == 2:
                gather_stage(qkv_rows_ptr, qkv_index_ptr, qkv_value_ptr, qkv_count_ptr, qkv_partial_ptr, pid,
                             programs, QKV_RANK, QKV_OUT, 1, QKV_SPLITS, QKV_LIST, GATHER_K, BLOCK_M, INTERPRET)
            phase = next_phase(bar_ptr, clock_ptr, phase, pid, programs, PERSISTENT, LOAD_POLL, CLOCK)
        # 3. rotary, K and V into the cache (adding up the masked product's partial sums)
        if PERSISTENT or STAGE == 3:
            if QKV_MODE > 0:
                rope_stage(qkv_partial_ptr, cos_ptr, sin_ptr, pos, q_ptr, k_cache_ptr, v_cache_ptr, max_seq, pid,
                            programs, HEADS, KV_HEADS, D // 2, QKV_SPLITS)
            else:
                rope_stage(z_qkv_ptr, cos_ptr, sin_ptr, pos, q_ptr, k_cache_ptr, v_cache_ptr, max_seq, pid,
                            programs, HEADS, KV_HEADS, D // 2, 0)
        phase = next_phase(bar_ptr, clock_ptr, phase, pid, programs, PERSISTENT, LOAD_POLL, CLOCK)
        # 4-5. attention over the prefix, then the chunks combined
        if PERSISTENT or STAGE == 4:
            attention_stage(q_ptr, k_cache_ptr, v_cache_ptr, pos, m_ptr, l_ptr, acc_ptr, max_seq, scale, pid,
                             programs, KV_HEADS, HEADS // KV_HEADS, MAX_CHUNKS, CHUNK, D)
        phase = next_phase(bar_ptr, clock_ptr, phase, pid, programs, PERSISTENT, LOAD_POLL, CLOCK)
        if PERSISTENT or STAGE == 5:
            combine_stage(m_ptr, l_ptr, acc_ptr, attended_ptr, pos, pid, programs, HEADS, MAX_CHUNKS, CHUNKS_P2,
                           CHUNK, D)
        phase = next_phase(bar_ptr, clock_ptr, phase, pid, programs, PERSISTENT, LOAD_POLL, CLOCK)
        # 6. o_proj, the residual added in its epilogue
        if PERSISTENT or STAGE == 6:
            gemv_stage(wo_ptr, attended_ptr, attn_norm_ptr, 1.0, mid_ptr, x_ptr, pid, programs, H, H, False, 2,
                        BLOCK_N, BLOCK_K, GEMV_FLAT, INTERPRET)
        phase = next_phase(bar_ptr, clock_ptr, phase, pid, programs, PERSISTENT, LOAD_POLL, CLOCK)
        # 7. RMSNorm → gate/up: dense with SwiGLU, or both rank adapters' B (one matrix, gate's rows first); or
        # (input masks) the normed input listed for gate and for up
        if PERSISTENT or STAGE == 7:
            if MLP_MODE == 2:
                normed_compact_stage(mid_ptr, mlp_norm_ptr, eps, z_gu_ptr, gate_scale_ptr, gate_threshold_ptr,
                                     gate_index_ptr, gate_value_ptr, gate_count_ptr, pid, programs, H, BLOCK_H,
                                     GU_SCALED, GATE_LIST)
                normed_compact_stage(mid_ptr, mlp_norm_ptr, eps, z_gu_ptr + H, up_scale_ptr, up_threshold_ptr,
                                     up_index_ptr, up_value_ptr, up_count_ptr, pid, programs, H, BLOCK_H, GU_SCALED,
                                     UP_LIST)
            else:
                inv_rms = inverse_rms(mid_ptr, eps, H, BLOCK_H)
                if MLP_MODE == 1:
                    gemv_stage(gu_w_ptr, mid_ptr, mlp_norm_ptr, inv_rms, z_gu_ptr, mid_ptr, pid, programs,
                               GATE_RANK + UP_RANK, H, True, 0, BLOCK_N, BLOCK_K, GEMV_FLAT, INTERPRET)
                else:
                    gemv_stage(gu_w_ptr, mid_ptr, mlp_norm_ptr, inv_rms, h_ptr, mid_ptr, pid, programs, I, H, True,
                               1, BLOCK_N, BLOCK_K, GEMV_FLAT, INTERPRET)
        phase = next_phase(bar_ptr, clock_ptr, phase, pid, programs, PERSISTENT, LOAD_POLL, CLOCK)
        if MLP_MODE > 0:
            # 8-9. gate's and up's masked products: each listed (rank adapters), then each gathered
            if MLP_MODE == 1:
                if PERSISTENT or STAGE == 8:
                    compact_stage(z_gu_ptr, z_gu_ptr, gate_threshold_ptr, gate_index_ptr, gate_value_ptr,
                                  gate_count_ptr, z_gu_ptr, pid, programs, GATE_RANK, 1, False, GATE_LIST, 0)
                    compact_stage(z_gu_ptr + GATE_RANK, z_gu_ptr, up_threshold_ptr, up_index_ptr, up_value_ptr,
                                  up_count_ptr, z_gu_ptr, pid, programs, UP_RANK, 1, False, UP_LIST, 0)
                phase = next_phase(bar_ptr, clock_ptr, phase, pid, programs, PERSISTENT, LOAD_POLL, CLOCK)
            if PERSISTENT or STAGE == 9:
                gather_stage(gate_rows_ptr, gate_index_ptr, gate_value_ptr, gate_count_ptr, gu_partial_ptr, pid,
                             programs, GATE_RANK, I, 1, GU_SPLITS, GATE_LIST, GATHER_K, BLOCK_M, INTERPRET)
                gather_stage(up_rows_ptr, up_index_ptr, up_value_ptr, up_count_ptr, gu_partial_ptr + GU_SPLITS * I,
                             pid, programs, UP_RANK, I, 1, GU_SPLITS, UP_LIST, GATHER_K, BLOCK_M, INTERPRET)
            phase = next_phase(bar_ptr, clock_ptr, phase, pid, programs, PERSISTENT, LOAD_POLL, CLOCK)
            # 10-12. h = silu(gate)·up made and listed by the neuron adapter's compaction, its rows of W_downᵀ
            # gathered, their sum added to the residual
            if PERSISTENT or STAGE == 10:
                compact_stage(h_ptr, down_scale_ptr, down_threshold_ptr, down_index_ptr, down_value_ptr,
                              down_count_ptr, gu_partial_ptr, pid, programs, I, 1, DOWN_SCALED, DOWN_LIST, GU_SPLITS)
            phase = next_phase(bar_ptr, clock_ptr, phase, pid, programs, PERSISTENT, LOAD_POLL, CLOCK)
            if PERSISTENT or STAGE == 11:
                gather_stage(down_ptr, down_index_ptr, down_value_ptr, down_count_ptr, down_partial_ptr, pid,
                             programs, I, H, 1, DOWN_SPLITS, DOWN_LIST, GATHER_K, BLOCK_M, INTERPRET)
            phase = next_phase(bar_ptr, clock_ptr, phase, pid, programs, PERSISTENT, LOAD_POLL, CLOCK)
            if PERSISTENT or STAGE == 12:
                residual_stage(down_partial_ptr, mid_ptr, out_ptr, pid, programs, H, DOWN_SPLITS, 1024)
        else:
            # 10. dense down, the residual added in its epilogue
            if PERSISTENT or STAGE == 11:
                gemv_stage(down_ptr, h_ptr, mlp_norm_ptr, 1.0, out_ptr, mid_ptr, pid, programs, H, I, False, 2,
                           BLOCK_N, BLOCK_K, GEMV_FLAT, INTERPRET)
        if CLOCK and PERSISTENT:  # the last program's end: the last stage has no barrier after it
            tl.atomic_max(clock_ptr + 1 + 2 * phase, _now())


# Tile sizes. A GEMV tile is BLOCK_N rows × BLOCK_K columns (the reference GEMV's best at 7B sizes, H100); a list
# gather item streams GATHER_K listed rows per step over BLOCK_M output columns (the reference's, masked_kernels).
# PROGRAMS_PER_SM: resident programs per multiprocessor (bench/layer_kernel.py sweeps these).
# GEMV_FLAT: a program's GEMV tiles as one loop of (tile, chunk) steps (layer_stages.gemv_stage).
# LIST_CHUNK: coefficients compacted per item of a list stage; 512 spreads a compaction over more programs than the
# reference's 2,048 (H200, session 11: RaNA −44% layers 3% faster on the 7B and SmolLM2 shapes).
# LOAD_POLL: barriers wait by acquire loads, not atomics (layer_stages.next_phase; slower, off).
# maxnreg: a cap on registers per thread (None: the compiler's choice), which sets how many programs fit on a
# multiprocessor. CLOCK: record each stage's times inside the launch (LayerKernel.stage_clock; --clock).
CONFIG = {"BLOCK_N": 8, "BLOCK_K": 512, "GATHER_K": 128, "BLOCK_M": 64, "num_warps": 4, "PROGRAMS_PER_SM": 4,
          "GEMV_FLAT": 0, "LIST_CHUNK": 512, "LOAD_POLL": 0, "maxnreg": None, "CLOCK": 0}
ATTENTION_CHUNK = 64


@dataclass
class LayerWeights:
    """The tensors a layer kernel reads from a block (rana_core.decode.engine's Block, or from_model's ModelBlock).
    A masked product is (rows, scale, threshold): rows of Aᵀ for a rank adapter, of Wᵀ for an input mask (TEAL,
    WINA) or of W_downᵀ for the neuron adapter; scale the per-row score factors (None: the score is |c|)."""

    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    eps: float
    qkv_mode: int  # 0 dense, 1 rank adapter, 2 input mask
    qkv: torch.Tensor | None  # the dense weight, or the rank adapter's B
    qkv_masked: tuple | None  # (rows, scale, threshold)
    wo: torch.Tensor
    mlp_mode: int  # 0 dense SwiGLU, 1 RaNA (rank adapters on gate and up, neuron adapter on down), 2 input masks
    gate_up: torch.Tensor | None  # [gate; up] dense, or both rank adapters' B stacked
    gate: tuple | None  # (rows, scale, threshold)
    up: tuple | None
    down: torch.Tensor  # the dense weight (mode 0), else the rows of W_downᵀ
    down_masked: tuple | None  # (rows, scale, threshold)


def _masked(part) -> tuple:
    return part.rows, part.scale, part.threshold


def layer_weights(block) -> LayerWeights | str:
    """What the layer kernel reads from `block`, or why it cannot run it (one line)."""
    from rana_core.decode.block import Block
    from rana_core.decode.parts import NeuronPart, RankPart
    from rana_core.decode.from_model import Dense, ModelBlock, ProjectionMLP, RanaMLP, _is_silu

    if type(block) not in (Block, ModelBlock):
        return "not a Llama-shaped block"
    if block.qkv_bias is not None:
        return "q/k/v biases"
    s = block.shape
    if s.head_dim & (s.head_dim - 1) or s.heads % s.kv_heads:
        return "a head size that is not a power of two, or uneven head groups"
    qkv = block.qkv
    if type(qkv) is RankPart and qkv.scale is None:
        qkv_parts = (1, qkv.B, _masked(qkv))
    elif type(qkv) is NeuronPart:
        qkv_parts = (2, None, _masked(qkv))
    elif isinstance(qkv, (nn.Linear, Dense)):
        qkv_parts = (0, qkv.weight, None)
    else:
        return "a QKV part other than dense, a rank adapter or an input mask"
    unsupported = "an MLP other than dense SwiGLU, RaNA's, or input masks on all of gate, up and down"
    if type(block) is Block:
        gate, up, down, silu = block.gate, block.up, block.down, True
        joint = getattr(block, "gate_up_B", None) if type(gate) is RankPart else getattr(block, "gate_up", None)
    elif type(block.mlp_part) is RanaMLP:
        mlp = block.mlp_part
        gate, up, down, joint, silu = mlp.gate, mlp.up, mlp.down, mlp.gate_up_B, _is_silu(mlp.act)
        if gate.rank != up.rank:  # RanaMLP pads the smaller rank; this kernel reads up's B right after gate's
            joint = torch.cat([gate.B, up.B])
    elif type(block.mlp_part) is ProjectionMLP:
        mlp = block.mlp_part
        gate, up, down, joint, silu = mlp.gate, mlp.up, mlp.down, mlp.fused, _is_silu(mlp.act)
    else:
        return unsupported
    if not silu:
        return unsupported
    kinds = tuple(type(m) for m in (gate, up, down))
    if kinds == (RankPart, RankPart, NeuronPart) and joint is not None and gate.scale is None is up.scale:
        mlp_parts = (1, joint, _masked(gate), _masked(up), down.rows, _masked(down))
    elif kinds == (NeuronPart, NeuronPart, NeuronPart) and (gate.scale is None) == (up.scale is None):
        mlp_parts = (2, None, _masked(gate), _masked(up), down.rows, _masked(down))
    elif all(isinstance(m, (nn.Linear, Dense)) for m in (gate, up, down)) and joint is not None:
        mlp_parts = (0, joint, None, None, down.weight, None)
    else:
        return unsupported
    return LayerWeights(block.attn_norm.weight, block.mlp_norm.weight, block.attn_norm.eps, *qkv_parts,
                        block.wo.weight, *mlp_parts)


def supports(block) -> str | None:
    """Why this block cannot run as one layer kernel, or None when it can."""
    weights = layer_weights(block)
    return weights if isinstance(weights, str) else None


def programs(device: torch.device, per_sm: int) -> int:
    """How many programs the launch takes: all must be resident at once (a barrier waits for every one), so a
    few per multiprocessor, far below what a multiprocessor holds of a kernel this size (4 warps each)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count * per_sm


def resident_per_sm(compiled, device: torch.device) -> int:
    """How many programs of a compiled kernel one multiprocessor holds at once, by registers, shared memory and
    warps: the persistent launch never asks for more (a program that never starts would hang every barrier)."""
    if device.type != "cuda":
        return 1
    compiled._init_handles()
    props = torch.cuda.get_device_properties(device)
    warps = compiled.metadata.num_warps
    registers = (max(compiled.n_regs, 1) * 32 + 255) // 256 * 256 * warps  # allocated per warp in units of 256
    by_registers = getattr(props, "regs_per_multiprocessor", 65536) // registers
    shared = compiled.metadata.shared
    by_shared = getattr(props, "shared_memory_per_multiprocessor", 233472) // shared if shared else 32
    by_warps = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
    return max(1, min(by_registers, by_shared, by_warps, 32))


STAGE_NAMES = {0: "norm + QKV product (B)", 1: "QKV: list active ranks", 2: "QKV: gather listed rows",
               3: "rotary + cache", 4: "attention chunks", 5: "attention combine", 6: "o_proj + residual",
               7: "norm + gate/up (B)", 8: "gate/up: list active ranks", 9: "gate/up: gather listed rows",
               10: "down: SwiGLU + list active neurons", 11: "down (gathered, or dense + residual)",
               12: "down sum + residual"}


class LayerKernel:
    """Runs one Block's decode step as one launch (persistent) or as a launch per stage (staged)."""

    def __init__(self, block, max_seq: int, persistent: bool, config: dict | None = None):
        self.block, self.persistent = block, persistent
        self.weights = layer_weights(block)
        if isinstance(self.weights, str):
            raise ValueError(f"the layer kernel cannot run this block: {self.weights}")
        self.grid = None
        self.marker = None  # staged: called with each stage before its launch (bench/layer_kernel.py times them)
        self.config = {**CONFIG, **(config or {})}
        s, w, c = block.shape, self.weights, self.config
        # the rows of each masked product's list: a rank, or the input size of an input mask
        self.qkv_rank = w.qkv_masked[0].shape[0] if w.qkv_masked else 0
        self.gate_rank = w.gate[0].shape[0] if w.gate else 0
        self.up_rank = w.up[0].shape[0] if w.up else 0
        self.max_chunks = math.ceil(max_seq / ATTENTION_CHUNK)
        device, dtype = w.wo.device, w.wo.dtype
        grid = programs(device, c["PROGRAMS_PER_SM"])

        def splits(width: int, out_features: int) -> int:
            """Shares of a masked product's list: enough items for every program, no share under one step."""
            return max(1, min(math.ceil(max(width, 1) / c["GATHER_K"]),
                              math.ceil(grid / math.ceil(out_features / c["BLOCK_M"]))))

        def listed(width: int) -> dict:
            """A masked product's list: its compaction chunk and buffers."""
            # gather_stage holds at most 32 chunks' ends: wider products take wider chunks
            chunk = min(max(c["LIST_CHUNK"], triton.next_power_of_2(math.ceil(width / 32))),
                        triton.next_power_of_2(max(width, 1)))
            return {"chunk": chunk, "index": torch.empty(max(width, 1), dtype=torch.int32, device=device),
                    "value": torch.empty(max(width, 1), dtype=torch.float32, device=device),
                    "count": torch.empty(math.ceil(max(width, 1) / chunk), dtype=torch.int32, device=device)}

        self.splits = {"qkv": splits(self.qkv_rank, s.qkv_out),
                       "gu": splits(max(self.gate_rank, self.up_rank), 2 * s.intermediate),
                       "down": splits(s.intermediate if w.mlp_mode else 0, s.hidden)}
        self.lists = {"qkv": listed(self.qkv_rank), "gate": listed(self.gate_rank), "up": listed(self.up_rank),
                      "down": listed(s.intermediate if w.mlp_mode else 0)}
        self.buffers = {
            "z_qkv": torch.empty(self.qkv_rank or s.qkv_out, dtype=dtype, device=device),  # rank or input size
            "qkv_partial": torch.empty(self.splits["qkv"] * s.qkv_out, dtype=torch.float32, device=device),
            "q": torch.empty(s.heads * s.head_dim, dtype=dtype, device=device),
            "m": torch.empty(s.heads * self.max_chunks, dtype=torch.float32, device=device),
            "l": torch.empty(s.heads * self.max_chunks, dtype=torch.float32, device=device),
            "acc": torch.empty(s.heads * self.max_chunks * s.head_dim, dtype=torch.float32, device=device),
            "attended": torch.empty(s.hidden, dtype=dtype, device=device),
            "z_gu": torch.empty(max(self.gate_rank + self.up_rank, 1), dtype=dtype, device=device),
            "gu_partial": torch.empty(2 * self.splits["gu"] * s.intermediate, dtype=torch.float32, device=device),
            "h": torch.empty(s.intermediate, dtype=dtype, device=device),
            "down_partial": torch.empty(self.splits["down"] * s.hidden, dtype=torch.float32, device=device),
            "mid": torch.empty(s.hidden, dtype=dtype, device=device),
            # CLOCK: the launch's start, then (last arrival, program 0's leaving) of each barrier, the last end
            "clock": torch.zeros(32, dtype=torch.int64, device=device),
            **{f"{name}_{part}": buffers[part] for name, buffers in self.lists.items()
               for part in ("index", "value", "count")},
        }

    def stages(self) -> list[int]:
        qkv = {0: [], 1: [1, 2], 2: [2]}[self.weights.qkv_mode]
        mlp = {0: [11], 1: [8, 9, 10, 11, 12], 2: [9, 10, 11, 12]}[self.weights.mlp_mode]
        return [0] + qkv + [3, 4, 5, 6, 7] + mlp

    def __call__(self, x: torch.Tensor, out: torch.Tensor, pos: torch.Tensor, k_cache, v_cache, cos, sin,
                 barrier: torch.Tensor) -> torch.Tensor:
        """out ← the layer applied to the residual x (both (hidden,)), this token's k and v written into the cache
        at pos. `barrier`: one int32 counter, zero at the call (the engine zeroes all of a step's at its start)."""
        w, b, s, c = self.weights, self.buffers, self.block.shape, self.config
        absent = barrier  # any tensor stands for a pointer the kernel's flags never read
        qkv, gate, up, down = (_pointers(m, absent) for m in (w.qkv_masked, w.gate, w.up, w.down_masked))
        args = (x, b["mid"], out, w.attn_norm, w.mlp_norm, w.eps,
                _or(w.qkv, absent), *qkv, b["z_qkv"], *self._list("qkv"), b["qkv_partial"],
                cos, sin, pos, b["q"], k_cache, v_cache, k_cache.shape[1], 1.0 / math.sqrt(s.head_dim),
                b["m"], b["l"], b["acc"], b["attended"], w.wo,
                _or(w.gate_up, absent), b["z_gu"], *gate, *self._list("gate"), *up, *self._list("up"),
                b["gu_partial"], b["h"],
                w.down, *down[1:], *self._list("down"), b["down_partial"], barrier, b["clock"])
        constants = dict(H=s.hidden, I=s.intermediate, HEADS=s.heads, KV_HEADS=s.kv_heads, D=s.head_dim,
                         QKV_MODE=w.qkv_mode, QKV_RANK=self.qkv_rank, QKV_SCALED=_scaled(w.qkv_masked),
                         MLP_MODE=w.mlp_mode, GATE_RANK=self.gate_rank, UP_RANK=self.up_rank,
                         GU_SCALED=_scaled(w.gate), DOWN_SCALED=_scaled(w.down_masked), MAX_CHUNKS=self.max_chunks,
                         CHUNKS_P2=triton.next_power_of_2(self.max_chunks), CHUNK=ATTENTION_CHUNK,
                         BLOCK_H=triton.next_power_of_2(s.hidden), BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
                         QKV_LIST=self.lists["qkv"]["chunk"], GATE_LIST=self.lists["gate"]["chunk"],
                         UP_LIST=self.lists["up"]["chunk"], DOWN_LIST=self.lists["down"]["chunk"],
                         QKV_SPLITS=self.splits["qkv"], GU_SPLITS=self.splits["gu"], DOWN_SPLITS=self.splits["down"],
                         GATHER_K=c["GATHER_K"], BLOCK_M=c["BLOCK_M"], GEMV_FLAT=c["GEMV_FLAT"],
                         LOAD_POLL=c["LOAD_POLL"], CLOCK=c["CLOCK"], INTERPRET=interpreting(),
                         num_warps=c["num_warps"])
        if c["maxnreg"] and not interpreting():
            constants["maxnreg"] = c["maxnreg"]
        if self.persistent:
            if self.grid is None:  # compiled once: how many programs fit at once depends on its registers
                compiled = _layer_kernel.warmup(*args, grid=(1,), PERSISTENT=True, STAGE=-1, **constants)
                self.grid = (programs(x.device, min(c["PROGRAMS_PER_SM"], resident_per_sm(compiled, x.device))),)
            _layer_kernel[self.grid](*args, PERSISTENT=True, STAGE=-1, **constants)
        else:
            for stage in self.stages():
                if self.marker is not None:
                    self.marker(stage)
                _layer_kernel[(programs(x.device, c["PROGRAMS_PER_SM"]),)](*args, PERSISTENT=False, STAGE=stage,
                                                                          **constants)
        return out

    def stage_clock(self) -> list[tuple[str, float, float]]:
        """(stage, work µs, barrier µs) of the last persistent launch with CLOCK on: work from the previous
        barrier's end (program 0 leaving it) to the last program's arrival, then the barrier's own latency."""
        t = self.buffers["clock"].tolist()
        stages, rows = self.stages(), []
        for i, stage in enumerate(stages):
            arrive = t[1 + 2 * i]
            leave = t[2 + 2 * i] if i < len(stages) - 1 else arrive
            rows.append((STAGE_NAMES[stage], (arrive - t[2 * i]) / 1e3, (leave - arrive) / 1e3))
        return rows

    def _list(self, name: str) -> tuple:
        """A masked product's list buffers in the kernel's argument order: index, value, count."""
        return tuple(self.buffers[f"{name}_{part}"] for part in ("index", "value", "count"))


def _or(tensor: torch.Tensor | None, absent: torch.Tensor) -> torch.Tensor:
    return absent if tensor is None else tensor


def _pointers(masked: tuple | None, absent: torch.Tensor) -> tuple:
    """(rows, scale, threshold) of a masked product, `absent` standing for what it does not have."""
    return tuple(_or(t, absent) for t in (masked or (None, None, None)))


def _scaled(masked: tuple | None) -> bool:
    return masked is not None and masked[1] is not None


def layer_kernels(blocks, max_seq: int, mode: str, config: dict | None = None) -> list:
    """A LayerKernel for each block that can run as one (None for the rest: they keep the reference path)."""
    if mode not in ("persistent", "staged"):
        raise ValueError(f"unknown layer kernel mode {mode!r}: use persistent or staged")
    return [LayerKernel(block, max_seq, mode == "persistent", config) if supports(block) is None else None
            for block in blocks]


