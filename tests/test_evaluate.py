import math

import torch

from rana_core.evaluate import perplexity


def test_perplexity_is_exp_of_mean_token_loss(tiny, tiny_windows):
    windows = tiny_windows["heldout"][:3]
    result = perplexity(tiny.model, windows, batch_size=2)
    with torch.no_grad():
        losses = []
        for window in windows:
            logprobs = torch.log_softmax(tiny.model(window[None]).logits[0].double(), dim=-1)
            losses += [-logprobs[t, window[t + 1]].item() for t in range(len(window) - 1)]
    assert result.predicted_tokens == len(losses) == 3 * 127
    assert math.isclose(result.perplexity, math.exp(sum(losses) / len(losses)), rel_tol=1e-5)
