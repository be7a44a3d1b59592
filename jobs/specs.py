"""What a job may ask for: kinds, their payloads, and the names pickers list. Torch-free.

Payloads are validated here, at submit time, so that a bad request is refused before it reaches the queue.
"""

from __future__ import annotations

from rana_core.config import MAX_FLOP_REDUCTION, CompressConfig
from rana_core.errors import RanaError
from rana_core.methods import METHODS
from rana_core.model_names import BUNDLED_MODELS

JOB_KINDS = ("compress",)


def validate_payload(kind: str, payload: dict) -> dict:
    """The normalised payload for `kind`, or a RanaError naming what is wrong."""
    if kind not in JOB_KINDS:
        raise RanaError(f"unknown job kind {kind!r}: use one of {', '.join(JOB_KINDS)}")
    if not isinstance(payload, dict):
        raise RanaError("a job payload must be a JSON object")
    config = CompressConfig.from_dict(payload).validate()
    return config.to_dict()


def method_names() -> list[str]:
    return list(METHODS)


def method_summaries() -> dict[str, str]:
    return {name: spec.summary for name, spec in METHODS.items()}


def allocations(method: str) -> tuple[str, ...]:
    return METHODS[method].allocations


def model_names() -> list[str]:
    return list(BUNDLED_MODELS)


def default_compress_options() -> dict:
    return CompressConfig().to_dict()


__all__ = [
    "JOB_KINDS",
    "MAX_FLOP_REDUCTION",
    "RanaError",
    "allocations",
    "default_compress_options",
    "method_names",
    "method_summaries",
    "model_names",
    "validate_payload",
]
