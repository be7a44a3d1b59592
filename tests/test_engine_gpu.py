"""On a GPU (pytest -m gpu), the decode engine of a stored run decodes what the adapted PyTorch model decodes, in
half precision, through the compiled kernels and CUDA-graph replay: after a 32-token held-out prompt, 64 steps
fed the same tokens give logits within half-precision rounding (on real weights: as close to the float32 run as
the adapted model in half precision is, see check_engine_against_model), the first 32 greedy tokens are the same
(a greedy text may reach a near-tie of the model's top two logits, where rounding may pick either; the
comparison stops there, see assert_same_greedy_tokens), and the FLOP reduction counted from the engine's masks on
the run's held-out windows is the run's within 0.02. Then a `rana latency` job end to end: a GPU worker stores the
run's speed beside the dense model's, per context and per layer. The model is each family's tiny random model,
and SmolLM2-135M's real weights where they are found."""

import os

import pytest
import torch

from rana_core.adapters.artifacts import load_adapters
from rana_core.adapters.base import inject, unload
from rana_core.config import CompressConfig
from rana_core.corpus import token_windows
from rana_core.decode.from_model import engine_from_model
from rana_core.errors import ModelNotFound
from rana_core.loading import load_model
from rana_core.pipeline import compress

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPT, STEPS, GREEDY = 32, 64, 32
# Half precision: products summed in another order differ by a few units of the last place of each logit, and a
# rank or neuron whose score sits at its threshold may flip; both stay far below these bounds on logits of order 10.
TOLERANCE = {"float16": 2e-2, "bfloat16": 1e-1}


def stored_run(name, method, allocation, dtype, budget, tmp_path, tokens=2048):
    loaded = load_model(name, device="cuda", dtype=dtype)
    config = CompressConfig(model=name, method=method, allocation=allocation, flop_reduction=budget, device="cuda",
                            dtype=dtype, calib_tokens=tokens, eval_tokens=tokens, seq_len=256, track_layers=False)
    result = compress(config, loaded=loaded, artifact_path=tmp_path / "adapters.safetensors")
    unload(loaded.layers)
    return loaded, load_adapters(loaded, result.artifact["path"], result.artifact["sha256"]), result, config


@torch.no_grad()
def reference_logits(loaded, adapters, prompt, feed=None, greedy: int = 0):
    """The adapted model (its own KV cache): logits after `prompt`, then after each token of `feed`, or of its
    own `greedy` picks. Returns (logits (steps, vocab) in float32, the tokens fed)."""
    inject(loaded.layers, adapters)
    try:
        out = loaded.model(prompt[None], use_cache=True)
        logits, fed = [out.logits[0, -1]], []
        for step in range(greedy or len(feed)):
            token = logits[-1].argmax() if greedy else feed[step]
            fed.append(token)
            out = loaded.model(token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[0, -1])
    finally:
        unload(loaded.layers)
    return torch.stack(logits).float(), torch.stack(fed)


def assert_same_greedy_tokens(ours, theirs, their_logits, bound):
    """The engine's greedy tokens are the model's, except that where the model's own top two logits are within
    `bound` (the logit tolerance) a half-precision rounding may pick the other: from there the texts differ, so the
    comparison stops. A pick the model's logits clearly rule out fails. Returns how many tokens agreed."""
    for step, (mine, its) in enumerate(zip(ours.tolist(), theirs.tolist())):
        if mine != its:
            margin = (their_logits[step, its] - their_logits[step, mine]).item()
            assert margin <= bound, f"step {step}: the engine chose {mine}, the model {its}, {margin:.3f} apart"
            return step
    return len(theirs)


def check_engine_against_model(loaded, adapters, result, config, exact=None):
    """`exact`: the same run in float32 (model, adapters). Without it (tiny models) the logits must agree within
    TOLERANCE. With it (real weights) the bound is measured: thresholded masks on real activations amplify
    rounding (SmolLM2 with CATS at 0.3: the adapted model in bf16 is up to 13 logits, median 4, from itself in
    float32, where the dense model moves by 1), so the engine must stay as close to the float32 run as the adapted
    PyTorch model in the same half precision does, within twice its distance."""
    text = token_windows(loaded.tokenizer, "heldout", 1024, 256)[0].cuda()
    prompt, feed = text[:PROMPT], text[PROMPT:PROMPT + STEPS]
    reference, _ = reference_logits(loaded, adapters, prompt, feed)
    scale = max(reference.abs().max().item(), 1.0)
    if exact is None:
        bound = TOLERANCE[config.dtype] * scale
    else:
        exact_logits, _ = reference_logits(*exact, prompt, feed)
        rounding = (reference - exact_logits).abs().amax(-1)  # the half-precision model's own distance, per step
        bound = 2 * rounding.max().item()

    engine = engine_from_model(loaded.model, adapters)
    engine.allocate(PROMPT + STEPS + 8)
    engine.prefill(prompt)
    engine.capture()
    # free-running greedy decoding, replayed from the graph, against the adapted model's own greedy picks
    their_logits, theirs = reference_logits(loaded, adapters, prompt, greedy=GREEDY)
    ours = []
    for _ in range(GREEDY):
        ours.append(engine.token.clone())
        engine.graph.replay()
    assert_same_greedy_tokens(torch.cat(ours), theirs, their_logits, bound)

    # logits at every step, both fed the same held-out tokens (the step reads its input token from engine.token)
    engine.allocate(PROMPT + STEPS + 8)
    engine.prefill(prompt)
    engine.capture()
    logits = []
    for token in feed:
        engine.token.copy_(token.view(1))
        engine.graph.replay()
        logits.append(engine.graph_logits[-1].float())
    ours = torch.stack(logits)
    if exact is None:
        worst = (ours - reference[1:]).abs().max().item()
        assert worst <= bound, (worst, scale)
    else:
        errors = (ours - exact_logits[1:]).abs().amax(-1)
        assert errors.max().item() <= bound, (errors.max().item(), rounding.max().item())
        assert errors.median().item() <= 2 * rounding[1:].median().item(), (errors.median(), rounding.median())

    held_out = token_windows(loaded.tokenizer, "heldout", config.eval_tokens, config.seq_len)
    counted = engine.flop_reduction_on(held_out)
    assert abs(counted - result.measured_flop_reduction) <= 0.02, (counted, result.measured_flop_reduction)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name, method, allocation", [
    ("tiny", "dense", "uniform"), ("tiny", "svd", "uniform"), ("tiny", "rana", "uniform"),
    ("tiny", "rana", "greedy"), ("tiny", "cats", "uniform"), ("tiny", "hybrid", "exact-loss"),
    ("tiny", "a3", "greedy"), ("tiny", "teal", "greedy"), ("tiny", "wina", "greedy"),
    ("tiny-qwen2", "rana", "greedy"), ("tiny-qwen2", "svd", "uniform"),
    ("tiny-gemma3", "rana", "greedy"), ("tiny-gemma3", "hybrid", "exact-loss"),
])
def test_the_engine_decodes_what_the_adapted_model_decodes(name, method, allocation, dtype, tmp_path):
    loaded, adapters, result, config = stored_run(name, method, allocation, dtype, 0.3, tmp_path)
    check_engine_against_model(loaded, adapters, result, config)


@pytest.mark.parametrize("method, allocation", [("rana", "greedy"), ("hybrid", "exact-loss"), ("cats", "uniform"),
                                                ("svd", "uniform"), ("a3", "uniform"), ("teal", "greedy")])
def test_the_engine_decodes_what_smollm2_adapted_decodes(method, allocation, tmp_path):
    name = os.environ.get("RANA_SMOLLM2_GGUF", "smollm2-135m")
    try:
        loaded, adapters, result, config = stored_run(name, method, allocation, "bfloat16", 0.44, tmp_path, 4096)
    except ModelNotFound as exc:
        pytest.skip(str(exc))
    exact = load_model(name, device="cuda", dtype="float32")
    exact_adapters = load_adapters(exact, result.artifact["path"], result.artifact["sha256"])
    check_engine_against_model(loaded, adapters, result, config, exact=(exact, exact_adapters))


def test_a_gpu_worker_stores_a_runs_decode_speed(tmp_path, monkeypatch):
    from sqlalchemy import select

    from db.migrate import upgrade
    from db.models import LatencyResult
    from db.session import get_engine, session_scope
    from jobs import queue
    from jobs.worker import Worker

    url = f"sqlite:///{tmp_path / 'gpu.db'}"
    monkeypatch.setenv("RANA_DATA_DIR", str(tmp_path))
    upgrade(url)
    queue.submit("compress", {"model": "tiny", "method": "rana", "flop_reduction": 0.3, "calib_tokens": 1024,
                              "eval_tokens": 512, "seq_len": 128}, url=url)
    Worker(url=url, device="cuda").run(exit_when_idle=True)
    (run,) = [j for j in queue.list_jobs(url=url) if j.run_id]
    job_id = queue.submit("run_latency", {"run_id": run.run_id, "contexts": [1, 128], "new_tokens": 64,
                                          "batches": [2, 4]}, url=url)
    Worker(url=url, device="cuda").run(exit_when_idle=True)
    view = next(j for j in queue.list_jobs(url=url) if j.id == job_id)
    assert view.status == "done", view.error
    try:
        with session_scope(url) as session:
            rows = session.execute(select(LatencyResult).where(LatencyResult.run_id == run.run_id)).scalars().all()
            assert sorted(r.context_tokens for r in rows) == [1, 128]
            for row in rows:
                assert row.ms_per_token > 0 and row.dense_ms_per_token > 0 and row.shapes["floor_ms"] > 0
                assert [b["batch"] for b in row.shapes["batches"]] == [2, 4]
                for b in row.shapes["batches"]:  # B tokens a step, for the run and for dense
                    assert b["tokens_per_s"] == pytest.approx(1e3 * b["batch"] / b["ms_per_step"])
                    assert b["dense_tokens_per_s"] == pytest.approx(1e3 * b["batch"] / b["dense_ms_per_step"])
                assert [layer["layer"] for layer in row.layers] == [0, 1]
                assert all(layer["qkv_ms"] > 0 and layer["attention_ms"] > 0 and layer["mlp_ms"] > 0
                           for layer in row.layers)
                assert all(0 < layer["mlp_kept"] < 1 for layer in row.layers)
    finally:
        get_engine(url).dispose()
