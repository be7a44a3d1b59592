"""The dashboard's view of LoRA recoveries: ranks heatmap and before/after on the run page, points on Pareto."""

import json
from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

from db.session import session_scope
from jobs import queue
from jobs.results import store_compression, store_recovery

PAGES = Path(__file__).resolve().parents[1] / "app" / "app_pages"


def seed(url) -> int:
    layers = [{"layer": i, "module": m, "adapter": "svd", "rank": 10, "max_rank": 64, "density": 1.0,
               "recon_error": 0.01, "sparsity": 0.3, "flops_per_token": 100.0, "dense_flops_per_token": 200}
              for i in range(3) for m in ("qkv", "gate", "up", "down")]
    result = {"model": "smollm2-135m", "method": "svd", "allocation": "uniform", "target_flop_reduction": 0.3,
              "measured_flop_reduction": 0.3, "measured_flop_reduction_whole_model": 0.2, "dense_perplexity": 40.0,
              "perplexity": 300.0, "calib_tokens": 8192, "eval_tokens": 8192, "seq_len": 512, "seconds": 1.0,
              "layers": layers, "config": {}}
    queue.submit("compress", {"model": "tiny", "flop_reduction": 0.3}, url=url)
    claimed = queue.claim("seed-worker", url=url)
    with session_scope(url) as session:
        run_id = store_compression(session, result, job_id=claimed.id)
        queue.mark_done(session, claimed.id, "seed-worker")
        for strategy, ranks, after in (("uniform", [8, 8, 8], 120.0), ("rankadaptor", [4, 16, 4], 110.0)):
            store_recovery(session, run_id, {
                "strategy": strategy, "ranks": ranks, "trainable_params": 1000, "train_tokens": 32768,
                "eval_tokens": 8192, "perplexity_before": 300.0, "perplexity_after": after,
                "dense_perplexity": 40.0, "seconds": 5.0, "flop_reduction_after": 0.28,
                "history": [{"round": 0, "ranks": ranks, "predicted": None, "spread": None, "measured": 4.0}]})
    return run_id


def test_run_detail_shows_each_recovery_ranks_and_perplexities(db_url):
    run_id = seed(db_url)
    at = AppTest.from_file(str(PAGES / "run_detail.py"), default_timeout=30)
    at.query_params["run"] = str(run_id)
    at.run()
    assert not at.exception, at.exception
    spec = next(json.loads(e.proto.spec) for e in at.get("plotly_chart")
                if json.loads(e.proto.spec)["layout"]["title"]["text"] == "LoRA rank per layer")
    heatmap = spec["data"][0]
    assert heatmap["y"] == ["#1 uniform", "#2 rankadaptor"]
    assert np.array(heatmap["z"]).tolist() == [[8, 8, 8], [4, 16, 4]]
    table = at.dataframe[0].value  # the recoveries table comes before the layers table
    assert table["perplexity_after"].tolist() == [120.0, 110.0]
    assert set(table["perplexity_before"]) == {300.0}


def test_pareto_shows_recovered_points_as_their_own_series(db_url):
    seed(db_url)
    at = AppTest.from_file(str(PAGES / "pareto.py"), default_timeout=30).run()
    assert not at.exception, at.exception
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    names = {t.get("name") for t in spec["data"]}
    assert {"svd", "svd+lora-uniform", "svd+lora-rankadaptor"} <= names
