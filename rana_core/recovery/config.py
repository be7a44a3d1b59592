"""The configuration of one recovery (LoRA fine-tuning after compression): validated, JSON round-trip, torch-free,
so that the CLI and the job queue check a request before any model loads.

Defaults are sized for the CPU (docs/results.md "Recovery" gives the timing): a `rankadaptor` recovery of SmolLM2-135M at
0.44 FLOP reduction took 827 s in the recovery bench on a shared two-core CPU, about 15 minutes as a job; `uniform`
and `error` take 6-7 minutes. 45k fine-tuning tokens in all: 10 probed configurations x 4,096, then 32,768.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rana_core.config import dataclass_from_dict
from rana_core.errors import RanaError

STRATEGIES = {
    "uniform": "the same LoRA rank in every layer",
    "error": "ranks proportional to each layer's measured reconstruction error",
    "rankadaptor": "ranks searched with a performance model fitted to short measured fine-tunes (RankAdaptor)",
}
RECOVER_CONFIG_VERSION = 1
MAX_RANK_BUDGET = 64


@dataclass
class RecoverConfig:
    strategy: str = "rankadaptor"  # one of STRATEGIES
    rank_budget: int = 8  # trainable parameters = those of uniform LoRA at this rank
    train_tokens: int = 32768  # training-split tokens of the final fine-tune (every strategy): 32 steps
    seq_len: int = 256  # training window length
    batch_size: int = 4  # windows per step of the final fine-tune
    lr: float = 1e-3  # AdamW peak learning rate (10% warm-up, cosine to a tenth)
    seed: int = 0  # LoRA initialisation, data order and the search's sampling
    eval_tokens: int = 16384  # held-out tokens for perplexity before and after (the quality bench uses 32768)
    eval_seq_len: int = 512  # the quality benchmark's evaluation length
    val_tokens: int = 2048  # a validation slice of the *training* split that scores configurations
    probe_tokens: int = 4096  # fine-tuning tokens per configuration the search measures: 8 steps
    probe_batch_size: int = 2  # windows per step of those short fine-tunes (more steps for the same tokens)
    initial_configs: int = 4  # search: measured before the performance model is first fitted (uniform first)
    rounds: int = 3  # search: rounds of proposals after that
    per_round: int = 2  # search: configurations measured per round
    # Fine-tuning moves the activations that input-adaptive masks (RaNA, CATS) threshold, so the same thresholds
    # keep more ranks and neurons afterwards; with this on, they are set again on training tokens, as compress
    # sets them, so the adapters spend their budget again.
    rethreshold: bool = False

    def validate(self) -> "RecoverConfig":
        """Raise a RanaError naming the first bad field; return self so calls chain."""
        if self.strategy not in STRATEGIES:
            raise RanaError(f"unknown strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        positive = ("rank_budget", "train_tokens", "seq_len", "batch_size", "eval_tokens", "eval_seq_len",
                    "val_tokens", "probe_tokens", "probe_batch_size", "initial_configs", "per_round")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise RanaError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 0:
            raise RanaError(f"rounds must be a non-negative integer, got {self.rounds!r}")
        if not isinstance(self.rethreshold, bool):
            raise RanaError(f"rethreshold must be true or false, got {self.rethreshold!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise RanaError(f"seed must be an integer, got {self.seed!r}")
        if self.rank_budget > MAX_RANK_BUDGET:
            raise RanaError(f"rank budget must be at most {MAX_RANK_BUDGET}, got {self.rank_budget}")
        if min(self.seq_len, self.eval_seq_len) < 2:
            raise RanaError("sequence lengths must be at least 2")
        for tokens, length in (("train_tokens", "seq_len"), ("val_tokens", "seq_len"), ("probe_tokens", "seq_len"),
                               ("eval_tokens", "eval_seq_len")):
            if getattr(self, tokens) < getattr(self, length):
                raise RanaError(f"{tokens.replace('_', ' ')} ({getattr(self, tokens)}) is less than one sequence "
                                f"of {getattr(self, length)} tokens")
        try:
            self.lr = float(self.lr)
        except (TypeError, ValueError):
            raise RanaError(f"learning rate must be a number, got {self.lr!r}") from None
        if not 0 < self.lr < 1:
            raise RanaError(f"learning rate must be in (0, 1), got {self.lr}")
        return self

    def to_dict(self) -> dict:
        return {"type": "recover", "version": RECOVER_CONFIG_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "RecoverConfig":
        return dataclass_from_dict(cls, data, "recovery option")
