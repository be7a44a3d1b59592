"""What a model family is, in one table: where each projection lives, how attention and the MLP are laid out, and
which methods can run on it. Every part of rana_core that needs to know a family reads it from here.

    family = family_of(loaded.model)            # by config.model_type, or by the Hugging Face module it comes from
    family.member_paths("qkv")                  # ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    gate, up, down, act = mlp_parts(layer_mlp(layer))
    shape = shape_of(loaded.config)             # hidden, intermediate, layers, heads, KV heads, head_dim, vocab

Adding a family is one entry in FAMILIES (and a test on its tiny random model, ``tiny-<family>``). Torch-free, so
that model names and configurations can be checked before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rana_core.errors import RanaError

# The adaptable modules of a decoder layer: each is one function of one input. q, k and v are stacked into one
# module (one decomposition and one mask serve the three); gate, up and down are the gated MLP's projections.
MODULES = ("qkv", "gate", "up", "down")
# The inputs those modules read: q/k/v share the attention's input, gate/up the MLP's, down reads act(gate)·up.
INPUT_OF = {"qkv": "attention", "gate": "mlp", "up": "mlp", "down": "down"}


@dataclass(frozen=True)
class Family:
    """One model family as Hugging Face transformers builds it. Paths are attribute names inside a decoder layer
    (``attention``, ``mlp``) and inside those (the projections)."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values of this family
    modeling: str  # the transformers module its classes live in, e.g. "modeling_llama"
    causal_lm: str  # the class of a causal LM of this family (tiny models are built from it)
    config_class: str
    attention: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    activation: str = "act_fn"  # the MLP's activation module
    activation_setting: str = "hidden_act"  # the config field that names it
    rotary: str = "rotate-half"  # how rotary pairs coordinates (adapters.a3 reads the pairs off the model itself)
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")  # per decoder layer
    qk_norm: bool = False  # RMS norms on queries and keys per head, before rotary
    qkv_bias: bool = False
    embedding_scale: bool = False  # embeddings multiplied by sqrt(hidden)
    sliding_window: str = "none"  # "none", "all" layers, or "some" layers (config.layer_types)
    engine: str = "llama"  # the decode engine's layer (rana_core.decode): "llama", "gemma", or "" when it has none
    unsupported: dict[str, str] = field(default_factory=dict)  # method -> why it cannot run on this family
    tiny: dict = field(default_factory=dict)  # config settings of its tiny random model, beyond TINY_CONFIG

    def member_paths(self, module: str) -> tuple[str, ...]:
        """Paths of the linears that make up an adaptable module, relative to a decoder layer."""
        if module == "qkv":
            return tuple(f"{self.attention}.{p}" for p in (self.q, self.k, self.v))
        return (f"{self.mlp}.{getattr(self, module)}",)

    def input_path(self, name: str) -> str:
        """The linear whose input is the layer's `name` input ("attention", "mlp" or "down")."""
        return {"attention": f"{self.attention}.{self.q}", "mlp": f"{self.mlp}.{self.up}",
                "down": f"{self.mlp}.{self.down}"}[name]

    def check_method(self, method: str) -> None:
        if method in self.unsupported:
            raise RanaError(f"{method} does not run on {self.name} models: {self.unsupported[method]}")


_A3_QK_NORM = "QK-norm normalises each head over all its coordinates, so dropping coordinates changes the norm"
_A3_BIAS = "A3 handles bias-free query/key/value projections only"
_A3_WINDOW = "A3's narrower attention does not apply a sliding window yet"

FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("llama", ("llama",), "modeling_llama", "LlamaForCausalLM", "LlamaConfig"),
    Family("mistral", ("mistral",), "modeling_mistral", "MistralForCausalLM", "MistralConfig",
           sliding_window="all", unsupported={"a3": _A3_WINDOW}, tiny={"sliding_window": 32}, engine=""),
    Family("qwen2", ("qwen2",), "modeling_qwen2", "Qwen2ForCausalLM", "Qwen2Config", qkv_bias=True,
           unsupported={"a3": _A3_BIAS}),
    Family("gemma3", ("gemma3_text", "gemma3"), "modeling_gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig",
           activation_setting="hidden_activation", qk_norm=True, embedding_scale=True, sliding_window="some",
           engine="gemma",
           norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"),
           unsupported={"a3": _A3_QK_NORM},
           tiny={"head_dim": 16, "sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"],
                 "tie_word_embeddings": True}),
)}

# The tiny random models (`tiny`, `tiny-<family>`): two layers, grouped-query attention (4 query, 2 KV heads),
# over a byte vocabulary (ids 0..255, 256 ends a text).
TINY_CONFIG = dict(vocab_size=257, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
                   bos_token_id=None, eos_token_id=256, pad_token_id=256)


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise RanaError(f"unknown model family {name!r}: use one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(thing) -> Family:
    """The family of a model, a config, or any module of a model (a decoder layer, its MLP or attention, or one
    of our wrappers around them): by config.model_type, else by the transformers module its class comes from."""
    model_type = getattr(getattr(thing, "config", thing), "model_type", None)
    if isinstance(model_type, str):
        for family in FAMILIES.values():
            if model_type in family.model_types:
                return family
        raise _unsupported(model_type)
    while hasattr(thing, "base"):  # our wrappers keep the original module as `base`
        thing = thing.base
    modeling = type(thing).__module__.rpartition(".")[2]
    for family in FAMILIES.values():
        if family.modeling == modeling:
            return family
    raise _unsupported(type(thing).__name__)


def _unsupported(what: str) -> RanaError:
    return RanaError(f"model family {what!r} is not supported: rana_core/architecture.py knows "
                     f"{', '.join(FAMILIES)}")


# --- the parts of a layer -------------------------------------------------------------------------------------

def layer_attention(layer):
    return getattr(layer, family_of(layer).attention)


def layer_mlp(layer):
    return getattr(layer, family_of(layer).mlp)


def set_layer_attention(layer, module) -> None:
    setattr(layer, family_of(layer).attention, module)


def set_layer_mlp(layer, module) -> None:
    setattr(layer, family_of(layer).mlp, module)


def mlp_parts(mlp) -> tuple:
    """(gate, up, down, activation) of an (unwrapped) gated MLP."""
    family = family_of(mlp)
    return tuple(getattr(mlp, name) for name in (family.gate, family.up, family.down, family.activation))


def attention_parts(attention) -> tuple:
    """(q, k, v, o) projections of an (unwrapped) attention module."""
    family = family_of(attention)
    return tuple(getattr(attention, name) for name in (family.q, family.k, family.v, family.o))


# --- the sizes of a model -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only model. ``head_dim`` defaults to hidden / heads (Llama); Gemma 3 sets its own."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def qkv_out(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    @property
    def grouped(self) -> bool:
        """Grouped- or multi-query attention: fewer K/V heads than query heads."""
        return self.kv_heads != self.heads


def shape_of(config) -> Shape:
    """The Shape of a Hugging Face config (a missing KV-head count means one per query head)."""
    heads = config.num_attention_heads
    return Shape(hidden=config.hidden_size, intermediate=config.intermediate_size, layers=config.num_hidden_layers,
                 heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                 vocab=config.vocab_size, head_dim=getattr(config, "head_dim", None) or 0)
