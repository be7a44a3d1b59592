"""Where a result came from: the code (git SHA), the packages, the model file, the device, the data and the seed.

Recorded with every run so that a number on the dashboard can be traced and reproduced. Every lookup degrades to
"unknown" rather than failing a run: an installed copy has no git checkout, a hub model has no single file.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from rana_core.loading import file_sha256

PACKAGES = ("rana-studio", "torch", "transformers", "safetensors", "numpy", "triton", "gguf")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def git_sha() -> str:
    """The project's commit, with "+dirty" when the work tree has uncommitted changes; RANA_GIT_SHA wins (for
    images built without .git)."""
    if os.environ.get("RANA_GIT_SHA"):
        return os.environ["RANA_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


_MODEL_HASHES: dict[tuple, str] = {}


def model_hash(loaded) -> str:
    """SHA-256 of the weights the model came from: its GGUF file, or a folder's weight files in name order, or
    (for models built in code, such as `tiny`) the tensors themselves. Cached per file size and mtime."""
    files: list[Path] = []
    if loaded.weights_file:
        files = [Path(loaded.weights_file)]
    elif loaded.source.kind == "folder":
        folder = Path(loaded.source.location)
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
    if files:
        key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        if key not in _MODEL_HASHES:  # a 7B model's 13 GiB take ~15 s to hash: once per process, once per file
            hashes = [file_sha256(path) for path in files]
            outer = hashlib.sha256()
            for digest in hashes:
                outer.update(digest.encode())
            _MODEL_HASHES[key] = outer.hexdigest() if len(files) > 1 else hashes[0]
        return _MODEL_HASHES[key]
    if loaded.source.kind == "hub":
        return "unknown (hub id)"
    import torch  # here, not at the top: the app reads provenance without loading torch

    digest = hashlib.sha256()
    for name, tensor in sorted(loaded.model.state_dict().items()):
        digest.update(name.encode())
        # as raw bytes: numpy has no bfloat16; for other dtypes the bytes are numpy's, so hashes stay the same
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "cpu"


def collect(loaded, config, calib_tokens: int, eval_tokens: int) -> dict:
    return {
        "git_sha": git_sha(),
        "packages": package_versions(),
        "seed": config.seed,
        "model": config.model,
        "model_sha256": model_hash(loaded),
        "device": str(config.device),
        "device_name": device_name(config.device),
        "dtype": config.dtype,
        "calib_tokens": calib_tokens,
        "eval_tokens": eval_tokens,
        "seq_len": config.seq_len,
        "host": platform.node(),
    }
