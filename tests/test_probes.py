"""What the model says: greedy replies to fixed prompts, scored where the answer is known, stored with each run."""

import pytest
import torch

from rana_core import probes
from rana_core.config import CompressConfig
from rana_core.errors import RanaError
from rana_core.pipeline import compress


def test_a_greedy_reply_is_what_generate_decodes_and_stops_at_the_end_token(tiny):
    ids = tiny.tokenizer.encode("Question: What is the capital of France?\nAnswer:")
    with torch.no_grad():
        expected = tiny.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert probes.greedy_reply(tiny.model, ids, eos_id=None, new_tokens=12) == expected
    # the same text told that its fifth token ends the sequence stops before it
    assert probes.greedy_reply(tiny.model, ids, eos_id=expected[4], new_tokens=12) == expected[:4]


class Parrot:
    """A tokenizer and model stand-in: whatever the prompt, the reply decodes to `reply`."""

    eos_id = None
    bos_ids: list = []  # the tokenizer interface: no begin-of-text token

    def __init__(self, reply):
        self.reply = reply

    def encode(self, text):
        return [1, 2]

    def decode(self, ids):
        return self.reply


def test_a_question_is_answered_when_the_reply_holds_the_answer_in_any_case(monkeypatch):
    monkeypatch.setattr(probes, "greedy_reply", lambda model, ids, eos_id: [3])
    result = probes.run_probes(None, Parrot("It is PARIS, and it has been since 987; Parisians say so."))
    scored = {r["prompt"]: r["correct"] for r in result["replies"]}
    assert scored["What is the capital of France?"] is True
    assert scored["What is the capital of Japan?"] is False
    assert [r["correct"] for r in result["replies"] if r["kind"] == "text"] == [None, None]  # shown, not scored
    questions = [p for p in probes.PROBES if p.answers]
    assert result["chat_accuracy"] == pytest.approx(1 / len(questions))


def test_a_run_stores_what_the_model_and_the_dense_model_say(tiny):
    config = CompressConfig(model="tiny", method="svd", flop_reduction=0.3, calib_tokens=512, eval_tokens=256,
                            seq_len=128)
    tiny.cache.clear()
    stages = []
    result = compress(config, loaded=tiny, progress=lambda f, m: stages.append(m))
    assert set(result.probes) == {"dense", "adapted"}
    for side in ("dense", "adapted"):
        assert [r["prompt"] for r in result.probes[side]["replies"]] == [p.prompt for p in probes.PROBES]
    # the adapted model speaks through its adapters: svd at 0.3 changes tiny's greedy text
    assert [r["reply"] for r in result.probes["dense"]["replies"]] != [
        r["reply"] for r in result.probes["adapted"]["replies"]]
    assert any("questions answered" in m for m in stages)
    config.probes = False
    assert compress(config, loaded=tiny).probes is None


def test_probes_must_be_a_yes_or_no():
    with pytest.raises(RanaError, match="probes must be true or false"):
        CompressConfig(model="tiny", probes="yes").validate()


@pytest.mark.bundled
def test_the_bundled_model_answers_every_question_dense():
    from rana_core.loading import load_model

    smol = load_model("smollm2-135m")
    result = probes.run_probes(smol.model, smol.tokenizer)
    assert result["chat_accuracy"] == 1.0, [(r["prompt"], r["reply"]) for r in result["replies"]]
