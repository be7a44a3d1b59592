import math

import pytest

from rana_core.config import CompressConfig
from rana_core.errors import BudgetError, RanaError
from rana_core.pipeline import compress

SMALL = dict(model="tiny", calib_tokens=2048, eval_tokens=1024, seq_len=128)


def test_svd_hits_its_budget_and_reports_every_module(tiny):
    messages = []
    result = compress(CompressConfig(method="svd", flop_reduction=0.3, **SMALL),
                      progress=lambda f, m: messages.append((f, m)), loaded=tiny)
    assert abs(result.measured_flop_reduction - 0.3) <= 0.015
    assert 0 < result.measured_flop_reduction_whole_model < result.measured_flop_reduction
    assert [(r.layer, r.module) for r in result.layers] == [(i, m) for i in range(2) for m in
                                                            ("qkv", "gate", "up", "down")]
    assert all(0 < r.recon_error < 1 and r.rank < r.max_rank and r.density == 1.0 for r in result.layers)
    assert result.perplexity != result.dense_perplexity
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {"load", "data", "dense eval", "build", "adapted eval"} <= {m.split(":")[0] for _, m in messages}
    data = result.to_json()
    for key in ("model", "method", "target_flop_reduction", "measured_flop_reduction", "dense_perplexity",
                "perplexity", "calib_tokens", "eval_tokens", "seconds", "layers"):
        assert key in data
    assert set(data["layers"][0]) >= {"layer", "module", "rank", "density", "recon_error"}


def test_dense_is_the_reference(tiny):
    result = compress(CompressConfig(method="dense", flop_reduction=0.4, **SMALL), loaded=tiny)
    assert result.target_flop_reduction == 0.0 and result.measured_flop_reduction == 0.0
    assert math.isclose(result.perplexity, result.dense_perplexity, rel_tol=1e-9)


def test_model_is_restored_after_a_run(tiny, tiny_windows):
    import torch

    batch = tiny_windows["heldout"][:1]
    with torch.no_grad():
        before = tiny.model(batch).logits
    compress(CompressConfig(method="svd", flop_reduction=0.5, **SMALL), loaded=tiny)
    with torch.no_grad():
        assert torch.equal(tiny.model(batch).logits, before)


@pytest.mark.parametrize("change, error", [
    ({"flop_reduction": 0.95}, BudgetError),
    ({"flop_reduction": -0.1}, BudgetError),
    ({"method": "magic"}, RanaError),
    ({"eval_tokens": 0}, RanaError),
    ({"calib_tokens": 64}, RanaError),  # below one sequence of 128
    ({"model": "no-such-model"}, RanaError),
])
def test_bad_configs_fail_before_any_work(change, error):
    with pytest.raises(error):
        CompressConfig(**{**SMALL, **change}).validate()


def test_config_round_trips_and_rejects_unknown_keys():
    config = CompressConfig(**SMALL)
    assert CompressConfig.from_dict(config.to_dict()) == config
    with pytest.raises(RanaError, match="unknown option"):
        CompressConfig.from_dict({"budget": 0.3})
