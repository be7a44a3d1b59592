"""Sentences that read a stored measurement for the user: what its numbers say about where the time went. Pure
functions of what the worker stored (no database, no Streamlit)."""

from __future__ import annotations


LAUNCH_BOUND = 2.5  # dense at this many times its bandwidth floor or more: a step waits on launches, not on bytes


def speed_reading(row: dict, costs: dict | None) -> str | None:
    """Why a run decodes at the speed it does, in a few sentences, from what its measurement stored: the share of
    dense's bytes its masks leave to read (its floor against dense's), how far dense runs above its own floor, and
    the cut MLP sections' fixed cost (the worker's section_costs). None where no floors were stored."""
    floor, dense_floor = row.get("floor_ms"), row.get("dense_floor_ms")
    if not floor or not dense_floor:
        return None
    speedup = row["dense_ms_per_token"] / row["ms_per_token"]
    allowed = dense_floor / floor
    dense_over = row["dense_ms_per_token"] / dense_floor
    if allowed <= 1:
        return (f"This run reads {1 / allowed:.0%} of dense's bytes a step (its factors outweigh what its masks "
                f"skip), so its bytes allow no speedup; it decodes at {speedup:.2f}× dense.")
    if dense_over >= LAUNCH_BOUND:
        return (f"Dense decodes at {dense_over:.1f}× its bandwidth floor on this GPU: a step of this model waits on "
                f"kernel launches, not on its weights' bytes. The {1 - 1 / allowed:.0%} of the bytes this run leaves "
                f"unread buy little there"
                + (f", and its adapted sections' extra launches cost more: {speedup:.2f}× dense (slower)."
                   if speedup < 1 else f": {speedup:.2f}× dense.")
                + " A cut pays in speed where dense runs near its floor: on larger models.")
    text = (f"The run reads {1 / allowed:.0%} of dense's bytes a step, so at most {allowed:.2f}× dense; it "
            f"decodes at {speedup:.2f}×, {speedup / allowed:.0%} of that.")
    mlp = (costs or {}).get("mlp") or {}
    if (mlp.get("fixed_ms") or 0) > 0 and mlp.get("cut_layers"):  # a fitted line through 0 or below says nothing
        text += (f" The cut MLP sections cost ~{1e3 * mlp['fixed_ms']:.0f} µs each whatever they keep (their extra "
                 f"launches), ~{mlp['fixed_ms'] * mlp['cut_layers']:.2f} ms of the {row['ms_per_token']:.2f} ms step "
                 f"(the profiled replay's timing events add a few µs a section).")
    return text


def prior_speed(model: str, history: list[dict]) -> str | None:
    """What the decode speed measured before on `model` (data.model_speed_history) says about a new run's, one
    sentence a GPU; None where nothing was measured."""
    sentences = []
    for h in history:
        text = f"On {h['device_name']}"
        if h["dense_over_floor"] is not None:
            text += f", dense {model} decoded at {h['dense_over_floor']:.1f}× its bandwidth floor"
            if h["dense_over_floor"] >= LAUNCH_BOUND:
                text += " (a step waits on kernel launches: expect little or no speedup from a cut)"
            text += ";"
        sentences.append(f"{text} the fastest run measured so far decodes at {h['best_speedup']:.2f}× dense "
                         f"({h['best_method']} at {h['best_budget']:.2f}, context {h['best_context']}).")
    return " ".join(sentences) or None
