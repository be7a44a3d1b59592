"""Load a causal language model and its tokenizer from a ModelSource, with no hub access for bundled names."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rana_core.architecture import TINY_CONFIG, family_named, family_of, shape_of
from rana_core.devices import process_memory_limit
from rana_core.errors import ModelNotFound
from rana_core.model_source import GEMMA3_PACKAGE, ModelSource, hub_off, resolve_model
from rana_core.residency import rest_layers

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ByteTokenizer:
    """UTF-8 bytes as tokens, id 256 as end of text: deterministic and dependency-free, for the `tiny` model."""

    vocab_size = 257
    eos_id = 256
    separator_ids = [256]
    bos_ids: list[int] = []  # no begin-of-text token

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer behind the small interface the rest of rana_core uses."""

    def __init__(self, tok):
        self.hf = tok
        self.vocab_size = len(tok)
        self.eos_id = tok.eos_token_id
        # Documents are joined by a blank line: it needs no special token the model may never have seen mid-text.
        self.separator_ids = tok.encode("\n\n", add_special_tokens=False)
        # What every sequence the model sees must start with: Gemma's tokenizer adds <bos>, and without it Gemma 3
        # 270M's perplexity on held-out Brown is 107.6 instead of 34.5 (2,048 tokens). SmolLM2's adds none.
        bos = tok.bos_token_id if getattr(tok, "add_bos_token", False) else None
        self.bos_ids = [bos] if bos is not None else []

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)


@dataclass
class LoadedModel:
    name: str
    model: nn.Module
    tokenizer: ByteTokenizer | HFTokenizer
    source: ModelSource
    weights_file: str | None = None  # the file the weights came from, for provenance hashes
    info: dict = field(default_factory=dict)
    # Results that depend only on the weights and the data (dense perplexity, calibration profiles), kept while
    # the model stays loaded so that sweeps and workers compute them once. Keys name the data they came from.
    cache: dict = field(default_factory=dict)

    def cached(self, key, compute):
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where the run computes: the model's device, also while its layers rest on the CPU."""
        return torch.device(self.info["device"])

    @property
    def family(self):
        return family_of(self.model)

    @property
    def shape(self):
        return shape_of(self.model.config)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_decoder().layers


def check_tokenizer(model_type: str, tokenizer, name: str) -> None:
    """Refuse, in one line, a Gemma model whose tokenizer adds no <bos>: Gemma needs it at the start of every
    sequence, and without it every number is silently wrong (Gemma 3 270M's held-out perplexity 643 against 36.6
    when transformers 5.17 read the bundled GGUF's tokenizer, which also splits text into other ids)."""
    if model_type.startswith("gemma") and isinstance(tokenizer, HFTokenizer) and not tokenizer.bos_ids:
        import transformers

        raise ModelNotFound(f"could not load model {name!r}: its tokenizer adds no <bos> token, which Gemma models "
                            f"need (transformers {transformers.__version__} reads it so; RaNA Studio is tested with "
                            f"the versions in requirements.txt)")


def tiny_model(family: str = "llama", seed: int = 0) -> nn.Module:
    """A deterministic random two-layer model of `family` (rana_core.architecture) over the byte vocabulary."""
    import transformers

    spec = family_named(family)
    config = getattr(transformers, spec.config_class)(**{**TINY_CONFIG, **spec.tiny})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, spec.causal_lm)(config)
    return model


def load_model(name: str, device: str = "cpu", dtype: str = "float32",
               layer_by_layer: bool | None = None) -> LoadedModel:
    """Load `name` (a bundled name, a local folder or a hub id) in eval mode on `device`. With `layer_by_layer`
    the decoder layers rest in CPU memory and visit `device` one at a time (rana_core.residency); None decides:
    on for a CUDA device when the weights would take more than LAYER_BY_LAYER_SHARE of the memory this process
    may use there."""
    if dtype not in DTYPES:
        raise ModelNotFound(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    source = resolve_model(name)
    torch_dtype = DTYPES[dtype]
    weights_file = None
    if source.kind == "tiny":
        model, tokenizer = tiny_model(source.location), ByteTokenizer()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        location, gguf_file = source.location, source.gguf_file
        if source.name == "gemma3-270m":
            location, gguf_file = _assemble_gemma3()
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        # Bundled models and local folders must never reach for a hub, not even for a tokenizer file.
        kwargs["local_files_only"] = source.kind != "hub"
        if source.kind == "hub" and hub_off():  # the hub client reads the flag at import: ask it now
            raise ModelNotFound(f"could not load model {name!r}: the hub is off here (HF_HUB_OFFLINE)")
        try:
            tok = AutoTokenizer.from_pretrained(location, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **kwargs)
        except OSError as exc:  # missing files, or a hub id on a machine with no hub
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotFound(f"could not load model {name!r}: {first_line}") from exc
        tokenizer = HFTokenizer(tok)
        if gguf_file:
            weights_file = str(Path(location) / gguf_file)
    check_tokenizer(model.config.model_type, tokenizer, name)
    family_of(model)  # a family rana_core.architecture does not know is one clear line, before any work
    model = model.to(dtype=torch_dtype).eval()
    model.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    if layer_by_layer is None:
        layer_by_layer = _needs_layer_by_layer(device, n_params * torch.finfo(torch_dtype).bits // 8)
    if layer_by_layer and device != "cpu":
        rest_layers(model, model.get_decoder().layers, device)
    else:
        layer_by_layer = False  # on the CPU the layers are where they would visit
        model = model.to(device=device)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        source=source,
        weights_file=weights_file,
        info={"parameters": n_params, "family": model.config.model_type, "dtype": dtype, "device": device,
              "layer_by_layer": layer_by_layer},
    )


LAYER_BY_LAYER_SHARE = 0.4  # of the GPU memory a process may use: above it the weights rest on the CPU


def _needs_layer_by_layer(device: str, weight_bytes: int) -> bool:
    if not device.startswith("cuda"):
        return False
    return weight_bytes > LAYER_BY_LAYER_SHARE * process_memory_limit(device)


def _assemble_gemma3() -> tuple[str, str]:
    import importlib

    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
        path = Path(package.assemble())
    except Exception as exc:  # the package's own failures (disk, missing chunks) become one line
        raise ModelNotFound(f"could not assemble gemma3-270m: {exc}") from exc
    return str(path.parent), path.name


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
