"""The configuration of one compression run: a dataclass that validates itself and round-trips through JSON.

Torch-free, so that the CLI, the job queue and the dashboard validate a request before any model is loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from rana_core.corpora import checked_corpus
from rana_core.devices import check_device_name
from rana_core.errors import BudgetError, RanaError
from rana_core.methods import METHODS
from rana_core.model_source import resolve_model
from rana_core.task_files import checked_tasks

MAX_FLOP_REDUCTION = 0.95  # budgets are FLOP reductions in [0, 0.95)
CONFIG_VERSION = 1


@dataclass
class CompressConfig:
    model: str = "smollm2-135m"  # bundled name, local folder or hub id
    # a name registered in rana_core.methods. TEAL by default: SmolLM2-135M-Instruct at a 0.3 cut with it still
    # answers 5 of the 6 chat probes (the default tokens), where svd's held-out perplexity is 315 (dense 41.9) and
    # uniform or greedy RaNA answer with blank lines
    method: str = "teal"
    flop_reduction: float = 0.3  # target share of the adaptable FLOPs removed, in [0, 0.95)
    allocation: str = "uniform"  # how the budget is spread over layers
    calib_tokens: int = 8192  # training-split tokens that set decompositions and thresholds
    eval_tokens: int = 8192  # held-out tokens for perplexity and measured FLOPs
    seq_len: int = 512  # window length for calibration and evaluation
    seed: int = 0  # for any sampling a method does; the data split itself is fixed
    device: str = "cpu"  # cpu, cuda, cuda:N or mps (rana_core.devices); a worker runs on its own RANA_DEVICE
    dtype: str = "float32"
    track_layers: bool = True  # measure each module's reconstruction error and sparsity (a second dense pass)
    # decoder layers rest in CPU memory and visit the GPU one at a time (rana_core.residency); None: when the
    # weights would take more than 40% of the GPU memory the process may use
    layer_by_layer: bool | None = None
    # accuracy beside perplexity: "cloze" and multiple-choice files (rana_core.task_files), adapted and dense
    tasks: list[str] = field(default_factory=list)
    # greedy replies to a fixed set of questions and openings (rana_core.probes), adapted and dense
    probes: bool = True
    # the text that calibrates (its training split) and evaluates (its held-out split): "brown", a local
    # file or folder (":FIELD" names its text field) or a hub id (rana_core.corpora); "" evaluates on `corpus`
    corpus: str = "brown"
    eval_corpus: str = ""

    def validate(self) -> "CompressConfig":
        """Raise a RanaError naming the first bad field; return self so calls chain."""
        if self.method not in METHODS:
            raise RanaError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        spec = METHODS[self.method]
        try:
            self.flop_reduction = float(self.flop_reduction)
        except (TypeError, ValueError):
            raise BudgetError(f"FLOP reduction must be a number, got {self.flop_reduction!r}") from None
        if not 0.0 <= self.flop_reduction < MAX_FLOP_REDUCTION:
            raise BudgetError(f"FLOP reduction must be in [0, {MAX_FLOP_REDUCTION}), got {self.flop_reduction}")
        if self.allocation not in spec.allocations:
            raise RanaError(
                f"method {self.method} has no allocation {self.allocation!r}: use {', '.join(spec.allocations)}"
            )
        for name in ("calib_tokens", "eval_tokens", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise RanaError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise RanaError("sequence length must be at least 2")
        for name in ("calib_tokens", "eval_tokens"):
            if getattr(self, name) < self.seq_len:
                raise RanaError(f"{name.replace('_', ' ')} ({getattr(self, name)}) is less than one sequence "
                                f"of {self.seq_len} tokens")
        if self.layer_by_layer not in (None, True, False):
            raise RanaError(f"layer_by_layer must be true, false or null (decide), got {self.layer_by_layer!r}")
        if self.probes not in (True, False):
            raise RanaError(f"probes must be true or false, got {self.probes!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise RanaError(f"unknown dtype {self.dtype!r}")
        check_device_name(self.device)  # its form only: the machine that runs the job has the device, or refuses it
        if self.tasks:
            self.tasks = checked_tasks(self.tasks)
        for name in ("corpus", "eval_corpus"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise RanaError(f"{name.replace('_', ' ')} must be a name, got {value!r}")
            if value or name == "corpus":  # a missing, empty, binary or unreadable file: one line, before queueing
                setattr(self, name, checked_corpus(value))
        resolve_model(self.model)
        return self

    def to_dict(self) -> dict:
        return {"type": "compress", "version": CONFIG_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "CompressConfig":
        return dataclass_from_dict(cls, data, "option")


def dataclass_from_dict(cls, data: dict, what: str):
    """cls(**data) without the "type"/"version" tags that to_dict adds; unknown keys are one clear error."""
    data = {k: v for k, v in data.items() if k not in ("type", "version")}
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise RanaError(f"unknown {what}(s): {', '.join(unknown)}")
    return cls(**data)
