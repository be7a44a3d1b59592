"""The registry of compression methods: names, what they do, their allocations, and a lazily imported builder.

Torch-free: pickers and validators list the registry without loading any model code. A method is one module in
this package with a ``build(loaded, calib_windows, config, progress, cache_dir=None) -> list`` function (the
adapters, not yet injected; ``cache_dir``, when given, is where results that outlive the run may be kept), plus
one ``register`` call below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from rana_core.errors import RanaError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    builder: str  # "module:function", imported on first use
    allocations: tuple[str, ...] = ("uniform",)

    def load_builder(self):
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)


METHODS: dict[str, MethodSpec] = {}


def method_label(method: str, allocation: str) -> str:
    """The name a method-allocation pair is shown, plotted and swept under: "rana-greedy", and the bare method for
    the paper's uniform allocation ("svd"), so that stored runs keep the series names they always had."""
    return method if allocation == "uniform" else f"{method}-{allocation}"


def parse_method_label(text: str) -> tuple[str, str]:
    """method_label's inverse: "rana-greedy" → ("rana", "greedy"), "hybrid-exact-loss" → ("hybrid", "exact-loss");
    a bare method takes its first allocation. An unknown method is a RanaError; an unknown allocation is left for
    the configuration's validation to name."""
    method, _, allocation = str(text).partition("-")
    if method not in METHODS:
        raise RanaError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    return method, allocation or METHODS[method].allocations[0]


def register(spec: MethodSpec) -> None:
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is registered twice")
    METHODS[spec.name] = spec


register(MethodSpec("dense", "the unmodified model (the budget is ignored)", "rana_core.methods.dense:build"))
register(MethodSpec("svd", "data-aware static low rank at the budget's rank", "rana_core.methods.svd:build"))
register(MethodSpec("cats", "MLP neurons skipped where |act(gate)| is small (CATS)", "rana_core.methods.cats:build"))
register(MethodSpec("rana", "input-adaptive rank masks on QKV and up/gate, neuron masks on down (RaNA)",
                    "rana_core.methods.rana:build", allocations=("uniform", "greedy")))
register(MethodSpec("a3", "static analytical widths per component: RoPE pair selection (QK), joint SVD (OV), "
                          "channel selection (MLP) (A3)", "rana_core.methods.a3:build",
                    allocations=("uniform", "greedy")))
register(MethodSpec("teal", "input coordinates of every linear kept by magnitude, allocated within each layer by "
                            "calibration error (TEAL: teal-greedy)", "rana_core.methods.teal:build",
                    allocations=("uniform", "greedy")))
register(MethodSpec("wina", "input coordinates kept by magnitude times the weight column's norm (WINA)",
                    "rana_core.methods.teal:build_wina", allocations=("uniform", "greedy")))
register(MethodSpec("hybrid", "one budget allocated per module over adapter types (dense, RaNA, CATS, TEAL, SVD) by "
                              "measured error curves", "rana_core.methods.hybrid:build",
                    allocations=("exact-loss", "greedy-loss", "exact-output", "greedy-output")))
