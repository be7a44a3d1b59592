"""A run's adapters on disk: their tensors (never the model's own weights) and what is needed to rebuild them.

    digest = save_adapters(adapters, path)        # safetensors file; returns its SHA-256
    adapters = load_adapters(loaded, path, digest)  # the same adapters, ready for adapters.inject

One safetensors file per run. Each adapter is described in the file's metadata (its kind, layer, module and
scalars such as the keep fraction) and its tensors are stored under "<index>.<name>". The checksum is checked
before anything is read, so a corrupt or truncated artifact is refused with one line, not half-loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rana_core.adapters.a3 import A3MLP, A3Attention
from rana_core.adapters.low_rank import LowRankUnit
from rana_core.adapters.base import layer_members
from rana_core.errors import RanaError
from rana_core.adapters.mlp import CatsMLP, NeuronMaskedUnit, RaNAMLP
from rana_core.loading import file_sha256
from rana_core.adapters.low_rank import RankMaskedUnit, RankPlan

FORMAT = "rana-adapters/1"


class ArtifactError(RanaError):
    """An artifact is missing, corrupt, or does not fit the model it is loaded into."""


def save_adapters(adapters: list, path: Path) -> str:
    """Write the adapters' tensors and recipe to `path`; returns the file's SHA-256."""
    entries, tensors = [], {}
    for index, adapter in enumerate(adapters):
        meta, own = _describe(adapter)
        entries.append(meta)
        tensors.update({f"{index}.{name}": t.detach().to("cpu").contiguous() for name, t in own.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    save_file(tensors, str(partial), metadata={"format": FORMAT, "adapters": json.dumps(entries)})
    partial.replace(path)  # a crash mid-write never leaves a file under the final name
    return file_sha256(path)


def load_adapters(loaded, path: Path, sha256: str | None = None) -> list:
    """Rebuild the adapters saved at `path` on `loaded`'s layers (not yet injected)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact {path} is missing")
    if sha256 is not None and file_sha256(path) != sha256:
        raise ArtifactError(f"artifact {path} is corrupt: its SHA-256 does not match the one stored with the run")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"artifact {path} cannot be read: {exc}") from None
    if metadata.get("format") != FORMAT:
        raise ArtifactError(f"artifact {path} is not a RaNA adapter file (format {metadata.get('format')!r})")
    layers = loaded.layers
    adapters = []
    for index, meta in enumerate(json.loads(metadata["adapters"])):
        own = {key.split(".", 1)[1]: value for key, value in tensors.items() if key.split(".", 1)[0] == str(index)}
        if not 0 <= meta["layer"] < len(layers):
            raise ArtifactError(f"artifact {path} adapts layer {meta['layer']}, but the model has {len(layers)}")
        try:
            adapters.append(_rebuild(layers[meta["layer"]], meta, own))
        except (KeyError, RuntimeError) as exc:
            raise ArtifactError(f"artifact {path} does not fit this model: {exc}") from None
    return adapters


def _plan_meta(plan: RankPlan) -> dict:
    return {"keep": plan.keep, "rank": plan.rank, "active": plan.active, "tau": plan.tau, "coverage": plan.coverage}


def _describe(adapter) -> tuple[dict, dict]:
    if isinstance(adapter, RankMaskedUnit):
        meta = {"kind": "rank", "layer": adapter.layer, "module": adapter.module, "plan": _plan_meta(adapter.plan)}
        return meta, {"A": adapter.A, "B": adapter.B, "tau": adapter.tau}
    if isinstance(adapter, LowRankUnit):
        return {"kind": "svd", "layer": adapter.layer, "module": adapter.module}, {"A": adapter.A, "B": adapter.B}
    if isinstance(adapter, RaNAMLP):
        meta = {"kind": "rana_mlp", "layer": adapter.layer, "down_keep": adapter.down.keep,
                "up": _plan_meta(adapter.up.plan), "gate": _plan_meta(adapter.gate.plan)}
        tensors = {"down.tau": adapter.down.tau}
        for which in ("up", "gate"):
            unit = getattr(adapter, which)
            tensors.update({f"{which}.A": unit.A, f"{which}.B": unit.B, f"{which}.tau": unit.tau})
        return meta, tensors
    if isinstance(adapter, CatsMLP):
        return {"kind": "cats", "layer": adapter.layer, "keep": adapter.keep}, {"tau": adapter.tau}
    if isinstance(adapter, A3Attention):  # q/k rows are the base's at `coords`: only the new tensors are saved
        return {"kind": "a3_attention", "layer": adapter.layer}, {
            "coords": adapter.coords, "v_weight": adapter.v_weight, "o_weight": adapter.o_weight}
    if isinstance(adapter, A3MLP):
        tensors = {"channels": adapter.channels} | ({"down_weight": adapter.down_weight} if adapter.refit else {})
        return {"kind": "a3_mlp", "layer": adapter.layer}, tensors
    raise ArtifactError(f"cannot save an adapter of type {type(adapter).__name__}")


def _factors(layer, module: str, tensors: dict, prefix: str = "") -> tuple[list, torch.Tensor, torch.Tensor]:
    members = layer_members(layer, module)
    A, B = tensors[f"{prefix}A"], tensors[f"{prefix}B"]
    out_f, in_f = sum(m.out_features for m in members), members[0].in_features
    if A.shape[0] != out_f or B.shape[1] != in_f or A.shape[1] != B.shape[0]:
        raise RuntimeError(f"{module} factors {tuple(A.shape)} x {tuple(B.shape)} do not fit a {out_f} x {in_f} layer")
    return members, A, B


def _rank_unit(layer, index: int, module: str, plan: dict, tensors: dict, prefix: str = "") -> RankMaskedUnit:
    members, A, B = _factors(layer, module, tensors, prefix)
    unit = RankMaskedUnit(members, index, module, A, B, RankPlan(**plan))
    unit.tau.copy_(tensors[f"{prefix}tau"])
    return unit


def _rebuild(layer, meta: dict, tensors: dict):
    index, kind = meta["layer"], meta["kind"]
    if kind == "rank":
        return _rank_unit(layer, index, meta["module"], meta["plan"], tensors)
    if kind == "svd":
        members, A, B = _factors(layer, meta["module"], tensors)
        return LowRankUnit(members, index, meta["module"], A, B)
    if kind == "rana_mlp":
        up = _rank_unit(layer, index, "up", meta["up"], tensors, "up.")
        gate = _rank_unit(layer, index, "gate", meta["gate"], tensors, "gate.")
        down = NeuronMaskedUnit(layer.mlp.down_proj, index, meta["down_keep"], float(tensors["down.tau"]))
        return RaNAMLP(layer.mlp, index, up, gate, down)
    if kind == "cats":
        return CatsMLP(layer.mlp, index, meta["keep"], float(tensors["tau"]))
    if kind == "a3_attention":
        return A3Attention(layer.self_attn, index, tensors["coords"], tensors["v_weight"], tensors["o_weight"])
    if kind == "a3_mlp":
        return A3MLP(layer.mlp, index, tensors["channels"], tensors.get("down_weight"))
    raise ArtifactError(f"unknown adapter kind {kind!r} in artifact")
