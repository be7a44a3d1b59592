import pytest

from rana_core.adapters.base import module_shapes
from rana_core.flops import attention_score_flops, dense_profile, linear_flops, low_rank_flops


def test_formulas_on_known_shapes():
    assert linear_flops(1536, 576) == 2 * 1536 * 576
    assert low_rank_flops(960, 576, 100) == 2 * 100 * (960 + 576)
    # 9 heads × 64 dims, window of 3: mean context 2, QKᵀ and AV each 2·9·64·2
    assert attention_score_flops(9, 64, 3) == 4 * 9 * 64 * 2


def test_tiny_profile_matches_hand_count(tiny):
    shapes = module_shapes(tiny.layers)
    # tiny: hidden 64, MLP 160, 4 query heads and 2 KV heads of 16 dims -> stacked QKV is (64 + 32 + 32) × 64
    assert shapes[(0, "qkv")] == (128, 64)
    assert shapes[(1, "down")] == (64, 160)
    profile = dense_profile(tiny.config, shapes, seq_len=128)
    per_layer = 2 * 128 * 64 + 2 * (2 * 160 * 64) + 2 * 64 * 160
    assert profile.adaptable_total == 2 * per_layer
    fixed = 2 * (2 * 64 * 64 + 4 * 4 * 16 * (129 / 2)) + 2 * 257 * 64
    assert profile.fixed == pytest.approx(fixed)


def test_reductions_count_missing_modules_as_dense(tiny):
    profile = dense_profile(tiny.config, module_shapes(tiny.layers), seq_len=128)
    assert profile.reductions({}) == (0.0, 0.0)
    half = {key: dense / 2 for key, dense in profile.adaptable.items()}
    adaptable, whole = profile.reductions(half)
    assert adaptable == pytest.approx(0.5)
    assert whole == pytest.approx(0.5 * profile.adaptable_total / profile.whole_model_total)
