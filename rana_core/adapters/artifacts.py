"""A run's adapters on disk: their tensors (never the model's own weights) and what is needed to rebuild them.

    digest = save_adapters(adapters, path)        # safetensors file; returns its SHA-256
    adapters = load_adapters(loaded, path, digest)  # the same adapters, ready for adapters.inject

One safetensors file per run. Each adapter is described in the file's metadata (its kind, layer and its own
scalars, such as a module or a keep fraction) and its tensors are stored under "<index>.<name>". What an adapter
saves and how it is rebuilt is the adapter's own business (``state`` and ``rebuild``, rana_core.adapters.base):
this module only reads and writes the file, and finds each kind's class among the adapter modules. The checksum is
checked before anything is read, so a corrupt or truncated artifact is refused with one line, not half-loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rana_core.adapters.base import ADAPTER_KINDS
from rana_core.errors import RanaError
from rana_core.loading import file_sha256

FORMAT = "rana-adapters/1"


class ArtifactError(RanaError):
    """An artifact is missing, corrupt, or does not fit the model it is loaded into."""


def save_adapters(adapters: list, path: Path) -> str:
    """Write the adapters' tensors and recipe to `path`; returns the file's SHA-256."""
    entries, tensors = [], {}
    for index, adapter in enumerate(adapters):
        if getattr(type(adapter), "kind", None) is None:
            raise ArtifactError(f"cannot save an adapter of type {type(adapter).__name__}")
        scalars, own = adapter.state()
        entries.append({"kind": type(adapter).kind, "layer": adapter.layer, **scalars})
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
    kinds = adapter_kinds()
    adapters = []
    for index, meta in enumerate(json.loads(metadata["adapters"])):
        own = {key.split(".", 1)[1]: value for key, value in tensors.items() if key.split(".", 1)[0] == str(index)}
        if not 0 <= meta["layer"] < len(layers):
            raise ArtifactError(f"artifact {path} adapts layer {meta['layer']}, but the model has {len(layers)}")
        if meta.get("kind") not in kinds:
            raise ArtifactError(f"unknown adapter kind {meta.get('kind')!r} in artifact {path}")
        try:
            adapters.append(kinds[meta["kind"]].rebuild(layers[meta["layer"]], meta["layer"], meta, own))
        except (KeyError, RuntimeError) as exc:
            raise ArtifactError(f"artifact {path} does not fit this model: {exc}") from None
    return adapters


def adapter_kinds() -> dict[str, type]:
    """Every adapter kind, by importing each module of rana_core.adapters (classes register themselves)."""
    import importlib
    import pkgutil

    import rana_core.adapters as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    return ADAPTER_KINDS
