"""What the model says: greedy replies to a fixed set of prompts, stored with every run beside the dense model's.

Perplexity on Brown text does not see everything a cut breaks: SmolLM2-135M-Instruct cut by 30% with RaNA keeps
its held-out perplexity close to dense and yet answers "What is the capital of France?" with blank lines. So each
run also asks a few short questions in the model's chat format (those with a known answer are scored: the reply
holds it as a whole word, in any case) and continues a few plain-text openings (shown, not scored).

A model without a chat template (the tiny test models) gets the questions as "Question: …\\nAnswer:". Replies are
greedy, at most NEW_TOKENS tokens, stopped at the end-of-sequence token.

    replies = run_probes(loaded.model, loaded.tokenizer)   # {"replies": [...], "chat_accuracy": 0.83}
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from rana_core.progress import ProgressFn, no_progress

NEW_TOKENS = 24


@dataclass(frozen=True)
class Probe:
    kind: str  # "chat": a question in the chat format; "text": a plain opening to continue
    prompt: str
    answers: tuple[str, ...] = ()  # any of these in the reply makes it right; none: shown, not scored


PROBES = (
    Probe("chat", "What is the capital of France?", ("Paris",)),
    Probe("chat", "What is the capital of Japan?", ("Tokyo",)),
    Probe("chat", "How many days are there in a week?", ("7", "seven")),
    Probe("chat", "Which planet is known as the Red Planet?", ("Mars",)),
    Probe("chat", "Who wrote Romeo and Juliet?", ("Shakespeare",)),
    Probe("chat", "What is the largest ocean on Earth?", ("Pacific",)),
    Probe("text", "The Fulton County Grand Jury said Friday"),
    Probe("text", "Once upon a time, in a small village,"),
)


def prompt_ids(tokenizer, probe: Probe) -> list[int]:
    hf = getattr(tokenizer, "hf", None)
    if probe.kind == "chat" and hf is not None and getattr(hf, "chat_template", None):
        ids = hf.apply_chat_template([{"role": "user", "content": probe.prompt}], add_generation_prompt=True,
                                     tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in newer transformers
    text = f"Question: {probe.prompt}\nAnswer:" if probe.kind == "chat" else probe.prompt
    return list(tokenizer.bos_ids) + tokenizer.encode(text)  # a chat template adds its own


@torch.no_grad()
def greedy_reply(model, ids: list[int], eos_id: int | None, new_tokens: int = NEW_TOKENS) -> list[int]:
    """Greedy continuation with the model's KV cache, stopped at `eos_id`."""
    device = next(model.parameters()).device
    out = model(torch.tensor([ids], device=device), use_cache=True)
    reply: list[int] = []
    for _ in range(new_tokens):
        token = int(out.logits[0, -1].argmax())
        if token == eos_id:
            break
        reply.append(token)
        out = model(torch.tensor([[token]], device=device), past_key_values=out.past_key_values, use_cache=True)
    return reply


def holds_answer(reply: str, answers: tuple[str, ...]) -> bool:
    """Whether any answer appears in the reply as a whole word, in any case ("7" is not in "1987")."""
    return any(re.search(rf"\b{re.escape(a)}\b", reply, re.IGNORECASE) for a in answers)


def run_probes(model, tokenizer, progress: ProgressFn = no_progress) -> dict:
    """Every probe's reply and whether it holds the answer; chat_accuracy over the scored probes."""
    replies = []
    for n, probe in enumerate(PROBES):
        progress(n / len(PROBES), f"probe {n + 1}/{len(PROBES)}")
        reply = tokenizer.decode(greedy_reply(model, prompt_ids(tokenizer, probe), tokenizer.eos_id))
        correct = holds_answer(reply, probe.answers) if probe.answers else None
        replies.append({"kind": probe.kind, "prompt": probe.prompt, "reply": reply,
                        "answers": list(probe.answers), "correct": correct})
    scored = [r["correct"] for r in replies if r["correct"] is not None]
    progress(1.0, f"{sum(scored)}/{len(scored)} questions answered")
    return {"replies": replies, "chat_accuracy": sum(scored) / len(scored) if scored else None}
