"""Each dashboard page in Streamlit's AppTest on a seeded database: what it shows, not only that it renders."""

from pathlib import Path

import base64
import json

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from db.session import session_scope
from jobs import queue
from jobs.results import store_compression

PAGES = Path(__file__).resolve().parents[1] / "app" / "app_pages"
MAIN = PAGES.parent / "main.py"

SEEDED = [  # (model, method, target, measured, perplexity)
    ("smollm2-135m", "dense", 0.0, 0.0, 39.8),
    ("smollm2-135m", "svd", 0.2, 0.201, 120.0),
    ("smollm2-135m", "svd", 0.3, 0.300, 337.8),
    ("tiny", "svd", 0.3, 0.304, 253.1),
    ("smollm2-135m", "rana", 0.3, 0.29, 59.7, "greedy"),
]


ADAPTER_OF = {"dense": "dense", "svd": "svd", "cats": "cats", "rana": "rank", "a3": "a3", "hybrid": "rank"}


def fake_result(model, method, target, measured, ppl, allocation="uniform"):
    layers = [{"layer": i, "module": m, "adapter": ADAPTER_OF[method], "rank": 10 + i + j, "max_rank": 64,
               "density": 0.5 + 0.1 * j, "recon_error": 0.01 * (i + 1) * (j + 1), "sparsity": 0.3,
               "sparsity_curve": [0.05, 0.1, 0.2, 0.3, 0.4 + 0.1 * i, 0.6],
               "flops_per_token": 100.0 - 10 * i, "dense_flops_per_token": 200}
              for i in range(2) for j, m in enumerate(("qkv", "gate", "up", "down"))]
    return {"model": model, "method": method, "allocation": allocation, "target_flop_reduction": target,
            "measured_flop_reduction": measured, "measured_flop_reduction_whole_model": measured / 2,
            "dense_perplexity": 39.8 if model != "tiny" else 252.7, "perplexity": ppl, "calib_tokens": 8192,
            "eval_tokens": 8192, "seq_len": 512, "seconds": 1.0, "layers": layers, "config": {}}


@pytest.fixture
def seeded(db_url):
    job_ids = []
    for row in SEEDED:
        job_id = queue.submit("compress", {"model": "tiny", "flop_reduction": row[2]}, url=db_url)
        claimed = queue.claim("seed-worker", url=db_url)
        with session_scope(db_url) as session:
            store_compression(session, fake_result(*row), job_id=claimed.id)
            queue.mark_done(session, claimed.id, "seed-worker")
        job_ids.append(job_id)
    queued = queue.submit("compress", {"model": "tiny", "method": "svd", "flop_reduction": 0.5}, url=db_url)
    return {"done": job_ids, "queued": queued}


class Trace:
    def __init__(self, spec):
        self.name = spec.get("name")
        self.x, self.y = _decode(spec.get("x")), _decode(spec.get("y"))


def _decode(values):
    """Plotly ships numeric arrays as base64 ("bdata") with a dtype; lists stay lists."""
    if isinstance(values, dict) and "bdata" in values:
        array = np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
        if "shape" in values:
            array = array.reshape([int(n) for n in str(values["shape"]).split(",")])
        return array.tolist()
    return values


def chart(at):
    """The traces and layout of the page's first Plotly chart, as the browser would receive them."""
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    return [Trace(t) for t in spec["data"]], spec["layout"]


def page_with(name, **params):
    """A page run with these query parameters (a shared link), checked to render without an exception."""
    at = AppTest.from_file(str(PAGES / name), default_timeout=30)
    for key, value in params.items():
        at.query_params[key] = str(value)
    at.run()
    assert not at.exception, at.exception
    return at


def run_page(name):
    at = AppTest.from_file(str(PAGES / name), default_timeout=30).run()
    assert not at.exception, at.exception
    return at


def test_pareto_plots_every_run_of_the_chosen_model_and_the_dense_line(seeded):
    at = run_page("pareto.py")
    assert at.selectbox(key="pareto_model").value == "smollm2-135m"
    data, layout = chart(at)
    traces = {trace.name: trace for trace in data}
    assert set(traces) == {"dense", "svd", "svd frontier", "rana-greedy", "dense (reference)"}
    assert list(traces["svd frontier"].x) == [0.201, 0.300]  # neither svd point beats the other on both axes
    assert list(traces["rana-greedy"].y) == [59.7]
    assert list(traces["svd"].x) == [0.201, 0.300] and list(traces["svd"].y) == [120.0, 337.8]
    assert list(traces["dense"].y) == [39.8]
    assert set(traces["dense (reference)"].y) == {39.8}
    assert layout["yaxis"]["type"] == "log"
    table = at.dataframe[0].value
    assert sorted(table["perplexity"]) == [39.8, 59.7, 120.0, 337.8]

    at.selectbox(key="pareto_model").set_value("tiny").run()
    data, _ = chart(at)
    assert [list(t.y) for t in data if t.name == "svd"] == [[253.1]]


def test_pareto_without_runs_says_what_to_do(db_url):
    at = run_page("pareto.py")
    assert "No finished runs yet" in at.info[0].value
    assert not at.get("plotly_chart")


def test_jobs_page_lists_status_progress_and_runs(seeded):
    at = run_page("job_list.py")
    table = at.dataframe[0].value
    assert len(table) == 6
    queued = table[table["job"] == seeded["queued"]].iloc[0]
    assert queued["status"] == "queued" and queued["progress"] == 0.0
    assert queued["what"] == "tiny / svd / 0.5"  # the one line jobs.kinds gives, as `rana jobs` prints it
    done = table[table["status"] == "done"]
    assert sorted(done["job"]) == sorted(seeded["done"]) and done["run"].notna().all()
    assert "done: 5" in at.caption[0].value and "queued: 1" in at.caption[0].value


def test_jobs_page_shows_host_and_device_and_cancels_then_retries(db_url):
    running = queue.submit("compress", {"model": "tiny"}, author="ada", url=db_url)
    queue.claim("gpu-7:42", url=db_url, device="cuda:0 (NVIDIA H100)")
    queued = queue.submit("compress", {"model": "tiny"}, url=db_url)
    at = run_page("job_list.py")
    table = at.dataframe[0].value.set_index("job")
    assert (table.loc[running, "host"], table.loc[running, "device"]) == ("gpu-7", "cuda:0 (NVIDIA H100)")
    assert table.loc[running, "author"] == "ada" and table.loc[running, "attempts"] == "1/3"

    at.selectbox(key="job_action_id").set_value(queued)
    at.button(key="job_cancel").click().run()
    assert not at.exception and "Cancel: 1 job(s)" in at.success[0].value
    assert {j.id: j.status for j in queue.list_jobs(url=db_url)}[queued] == "cancelled"
    at.button(key="job_cancel").click().run()  # twice: one clear message, nothing changes
    assert "only queued or running jobs can be cancelled" in at.error[0].value
    at.button(key="job_retry").click().run()
    assert {j.id: j.status for j in queue.list_jobs(url=db_url)}[queued] == "queued"


def test_jobs_page_shows_the_error_of_a_failed_job(db_url):
    job_id = queue.submit("compress", {"model": "tiny"}, url=db_url)
    queue.claim("w", url=db_url)
    queue.fail(job_id, "w", "ModelNotFound: boom", url=db_url)
    at = run_page("job_list.py")
    assert any("boom" in e.value for e in at.error)


def test_new_run_queues_the_job_the_form_describes(db_url):
    at = run_page("new_run.py")
    at.selectbox(key="new_run_model").set_value("tiny")
    at.selectbox(key="new_run_method").set_value("rana").run()
    assert at.selectbox(key="new_run_allocation").options == ["uniform", "greedy"]
    at.selectbox(key="new_run_allocation").set_value("greedy")
    at.slider(key="new_run_budget").set_value(0.44)
    at.number_input(key="new_run_calib").set_value(2048)
    at.number_input(key="new_run_eval").set_value(1024)
    at.number_input(key="new_run_seq_len").set_value(256)
    at.text_input(key="new_run_author").set_value("Ada")
    at.text_input(key="new_run_tags").set_value("ablation, greedy ,")
    at.text_input(key="new_run_tasks").set_value("cloze")
    at.button(key="new_run_submit").click().run()
    assert not at.error and "Queued job" in at.success[0].value
    (job,) = queue.list_jobs(url=db_url)
    assert (job.status, job.author, job.tags) == ("queued", "Ada", ("ablation", "greedy"))
    assert {k: job.payload[k] for k in ("model", "method", "allocation", "flop_reduction", "calib_tokens",
                                        "eval_tokens", "seq_len", "tasks")} == {
        "model": "tiny", "method": "rana", "allocation": "greedy", "flop_reduction": 0.44, "calib_tokens": 2048,
        "eval_tokens": 1024, "seq_len": 256, "tasks": ["cloze"]}


def test_new_run_refuses_bad_input_with_a_message_and_no_row(db_url):
    at = run_page("new_run.py")
    at.selectbox(key="new_run_model").set_value("other: a local folder or hub id").run()
    at.text_input(key="new_run_model_other").set_value("./not/here")
    at.button(key="new_run_submit").click().run()
    assert "model folder not found" in at.error[0].value
    assert not at.exception and queue.list_jobs(url=db_url) == []


def test_pages_explain_a_database_without_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("RANA_DB_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    for page in ("new_run.py", "job_list.py", "pareto.py"):
        at = run_page(page)
        assert "rana db upgrade" in at.error[0].value


def test_navigation_lists_the_three_pages(db_url):
    at = AppTest.from_file(str(MAIN), default_timeout=30).run()
    assert not at.exception
    assert at.title[0].value == "New run"
    at.switch_page("app_pages/pareto.py").run()
    assert at.title[0].value == "Pareto"


def test_pareto_frontier_skips_dominated_runs():
    import pandas as pd

    from app.charts import pareto_frontier

    points = pd.DataFrame({"measured_flop_reduction": [0.2, 0.3, 0.3, 0.44, 0.5],
                           "perplexity": [50.0, 70.0, 60.0, 55.0, 90.0]})
    frontier = pareto_frontier(points)
    # (0.3, 70) loses to (0.3, 60), and (0.3, 60) to (0.44, 55): both are dominated
    assert list(zip(frontier["measured_flop_reduction"], frontier["perplexity"])) == [
        (0.2, 50.0), (0.44, 55.0), (0.5, 90.0)]
    # accuracy: higher is better. (0.3, 0.40) loses to (0.3, 0.45), and (0.3, 0.45) to (0.44, 0.50)
    points = pd.DataFrame({"measured_flop_reduction": [0.2, 0.3, 0.3, 0.44, 0.5],
                           "acc": [0.60, 0.40, 0.45, 0.50, 0.30]})
    frontier = pareto_frontier(points, y="acc", lower=False)
    assert list(zip(frontier["measured_flop_reduction"], frontier["acc"])) == [(0.2, 0.60), (0.44, 0.50), (0.5, 0.30)]


def test_pareto_filters_by_method_author_and_tag(db_url):
    for i, (author, tags) in enumerate([("ada", ["baseline"]), ("grace", ["ablation"]), ("ada", ["ablation"])]):
        job_id = queue.submit("compress", {"model": "tiny"}, author=author, tags=tags, url=db_url)
        claimed = queue.claim("w", url=db_url)
        with session_scope(db_url) as session:
            store_compression(session, fake_result("tiny", "svd", 0.1 * (i + 1), 0.1 * (i + 1), 100.0 + i),
                              job_id=claimed.id, author=author, tags=tags)
            queue.mark_done(session, job_id, "w")
    at = run_page("pareto.py")
    at.multiselect(key="pareto_authors").set_value(["ada"]).run()
    assert sorted(at.dataframe[0].value["perplexity"]) == [100.0, 102.0]
    at.multiselect(key="pareto_tags").set_value(["ablation"]).run()
    assert list(at.dataframe[0].value["perplexity"]) == [102.0]
    at.multiselect(key="pareto_methods").set_value([]).run()
    assert "No run matches" in at.info[0].value


def test_new_run_queues_a_sweep_of_methods_and_budgets(db_url):
    at = run_page("new_run.py")
    at.segmented_control(key="new_run_mode").set_value("Sweep").run()
    at.selectbox(key="new_run_model").set_value("tiny")
    at.multiselect(key="sweep_methods").set_value(["rana-greedy", "cats"])
    at.slider(key="sweep_range").set_value((0.2, 0.4))
    at.number_input(key="sweep_step").set_value(0.1).run()
    assert "3 budgets (0.20, 0.30, 0.40) × 2 methods" in at.caption[0].value
    at.checkbox(key="new_run_speed").check()
    at.button(key="new_run_submit").click().run()
    assert not at.error and "Queued sweep" in at.success[0].value
    jobs = queue.list_jobs(url=db_url)
    sweep = next(j for j in jobs if j.kind == "sweep")
    assert sweep.payload["latency"] == {"contexts": [1, 512], "new_tokens": 256, "dtype": "bfloat16",
                                       "batches": []}
    points = sorted((j.payload["method"], j.payload["allocation"], j.payload["flop_reduction"])
                    for j in jobs if j.parent_id == sweep.id)
    assert points == [("cats", "uniform", 0.2), ("cats", "uniform", 0.3), ("cats", "uniform", 0.4),
                      ("rana", "greedy", 0.2), ("rana", "greedy", 0.3), ("rana", "greedy", 0.4)]


def heatmaps(at):
    figures = {}
    for element in at.get("plotly_chart"):
        spec = json.loads(element.proto.spec)
        if spec["data"] and spec["data"][0]["type"] == "heatmap":
            figures[spec["layout"]["title"]["text"]] = spec["data"][0]
    return figures


def test_run_detail_shows_layer_heatmaps_and_a_difference(seeded):
    runs = {}
    with session_scope() as session:
        from db.models import Run
        for run in session.query(Run):
            runs[(run.model, run.method, run.target_flop_reduction)] = run.id
    svd_02, svd_03 = runs[("smollm2-135m", "svd", 0.2)], runs[("smollm2-135m", "svd", 0.3)]
    at = AppTest.from_file(str(PAGES / "run_detail.py"), default_timeout=30)
    at.query_params["run"] = str(svd_02)
    at.run()
    assert not at.exception and at.selectbox(key="detail_run").value == svd_02
    maps = heatmaps(at)
    assert set(maps) == {"adapter that ran the module", "FLOPs spent / dense FLOPs", "static rank / max rank",
                         "mean active ranks / static rank", "reconstruction error ‖f−f̂‖²/‖f‖²",
                         "rank-importance sparsity (share for 90% energy)"}
    error = maps["reconstruction error ‖f−f̂‖²/‖f‖²"]
    assert error["y"] == ["qkv", "gate", "up", "down"] and error["x"] == [0, 1]
    assert np.allclose(np.array(_decode(error["z"])), [[0.01, 0.02], [0.02, 0.04], [0.03, 0.06], [0.04, 0.08]])
    assert np.allclose(np.array(_decode(maps["FLOPs spent / dense FLOPs"]["z"]))[:, 1], 0.45)

    curves = next(json.loads(e.proto.spec) for e in at.get("plotly_chart")
                  if json.loads(e.proto.spec)["layout"].get("yaxis", {}).get("title", {}).get("text")
                  == "share of ranks (neurons) needed")
    qkv = next(t for t in curves["data"] if t["name"] == "qkv")
    assert np.allclose(_decode(qkv["y"]), [0.05, 0.1, 0.2, 0.3, 0.45, 0.6])  # averaged over the two layers

    at.selectbox(key="detail_other").set_value(svd_03).run()
    assert not at.exception and at.query_params["other"] in (str(svd_03), [str(svd_03)])
    titles = set(heatmaps(at))
    assert f"{svd_03} − {svd_02}" in titles and f"run {svd_03}: recon_error" in titles


def test_compare_diffs_runs_and_keeps_the_selection_in_the_url(seeded):
    at = AppTest.from_file(str(PAGES / "compare.py"), default_timeout=30)
    at.query_params["runs"] = "2,3"
    at.run()
    assert not at.exception and at.multiselect(key="compare_runs").value == [2, 3]
    diff = at.dataframe[1].value
    assert list(diff.columns) == ["run 2", "run 3"]
    assert diff.loc["perplexity"].tolist() == ["120.0", "337.8"] and "target" in diff.index
    assert "author" not in diff.index  # the same for both: hidden while "only what differs" is on
    at.multiselect(key="compare_runs").set_value([2, 3, 5]).run()
    assert at.query_params["runs"] in ("2,3,5", ["2,3,5"])
    assert at.get("download_button")  # CSV and JSON export


def test_latency_page_plots_ms_per_token_and_speedup(db_url):
    from jobs.results import store_latency

    rows = [{"model": "llama2-7b-shape", "device_name": "NVIDIA H100", "dtype": "float16", "engine": "graphs",
             "flop_reduction": budget, "measured_flop_reduction": budget, "context_tokens": context,
             "new_tokens": 492, "ms_per_token": ms, "dense_ms_per_token": dense, "shapes": {}}
            for budget, ms, dense in ((0.0, 8.0, 8.0), (0.44, 5.0, 8.0)) for context in (1, 512)]
    with session_scope(db_url) as session:
        store_latency(session, rows)
    at = run_page("latency.py")
    specs = [json.loads(e.proto.spec) for e in at.get("plotly_chart")]
    speedup = {t["name"]: _decode(t["y"]) for t in specs[1]["data"]}
    assert speedup == {"llama2-7b-shape · graphs · −44%": [1.6, 1.6]}
    assert len(specs[0]["data"]) == 2


def test_pages_render_two_thousand_runs(db_url):
    """Pareto, compare and run detail render over 2,000 runs, and the Pareto chart carries each of them. (How long
    they take is bench/app_pages.py's to measure, not a test's.)"""
    from db.models import Evaluation, Run

    with session_scope(db_url) as session:
        for i in range(2000):
            run = Run(model="smollm2-135m", method=("svd", "cats", "rana")[i % 3], allocation="uniform",
                      target_flop_reduction=(i % 50) / 100, calib_tokens=8192, seconds=1.0, config={},
                      author=("ada", "grace")[i % 2], tags=["bulk"])
            run.evaluations.append(Evaluation(split="heldout", tokens=8192, seq_len=512, perplexity=40 + i % 97,
                                              dense_perplexity=40.0, measured_flop_reduction=(i % 50) / 100,
                                              measured_flop_reduction_whole_model=(i % 50) / 150))
            session.add(run)
    for page in ("compare.py", "run_detail.py"):
        run_page(page)  # no exception
    at = run_page("pareto.py")
    data, _ = chart(at)
    assert sum(len(t.x) for t in data if not t.name.endswith(("frontier", "(reference)"))) == 2000


def test_pareto_state_round_trips_through_the_url(seeded):
    at = AppTest.from_file(str(PAGES / "pareto.py"), default_timeout=30)
    at.query_params.update({"model": "smollm2-135m", "methods": "svd", "log": "0"})
    at.run()
    assert not at.exception and at.multiselect(key="pareto_methods").value == ["svd"]
    data, layout = chart(at)
    assert {t.name for t in data} == {"svd", "svd frontier", "dense (reference)"}
    assert layout["yaxis"]["type"] == "linear"


def test_run_detail_shows_the_model_size_and_a3_runs_join_the_pareto_page(db_url):
    result = fake_result("smollm2-135m", "a3", 0.3, 0.301, 80.0, "greedy")
    dense = {"params": 134.5e6, "decoder_linear_params": 106.2e6, "kv_bytes_per_token": 92160,
             "flops_per_token": 300e6}
    result["model_stats"] = {"params": 102.6e6, "decoder_linear_params": 74.3e6, "kv_bytes_per_token": 64512,
                             "flops_per_token": 220e6, "dense": dense}
    with session_scope(db_url) as session:
        store_compression(session, result)
    at = run_page("run_detail.py")
    metrics = {m.label: (m.value, m.delta) for m in at.metric}
    assert metrics["Parameters"] == ("102.6M", "dense 134.5M")
    assert metrics["KV cache (fp16)"] == ("63.0 KiB/token", "dense 90.0 KiB/token")
    data, _ = chart(run_page("pareto.py"))
    assert "a3-greedy" in {t.name for t in data}


def test_a_hybrid_run_shows_its_chosen_adapters_and_keeps_and_is_its_own_pareto_series(db_url):
    result = fake_result("smollm2-135m", "hybrid", 0.3, 0.298, 50.0, "exact-loss")
    chosen = {0: ("cats", 0.8), 1: ("rank", 0.6)}  # layer 0's MLP took CATS, layer 1's RaNA; QKV dense in 0
    for row in result["layers"]:
        adapter, keep = chosen[row["layer"]]
        if row["module"] == "qkv":
            row["adapter"], row["planned_keep"] = ("dense", None) if row["layer"] == 0 else ("rank", 0.7)
        else:
            row["adapter"] = "neuron" if adapter == "rank" and row["module"] == "down" else adapter
            row["planned_keep"] = keep
    with session_scope(db_url) as session:
        store_compression(session, result)
    at = run_page("run_detail.py")
    maps = heatmaps(at)
    planned = np.array(_decode(maps["keep the allocation chose (QKV / whole MLP)"]["z"]), dtype=float)
    assert np.isnan(planned[0, 0]) and planned[0, 1] == pytest.approx(0.7)
    assert np.allclose(planned[1:, 0], 0.8) and np.allclose(planned[1:, 1], 0.6)
    adapters = maps["adapter that ran the module"]
    codes = np.array(_decode(adapters["z"]), dtype=float)  # categorical: one code per adapter type
    assert codes[1, 0] == codes[2, 0] == codes[3, 0] != codes[1, 1]
    assert adapters["colorbar"]["ticktext"][int(codes[3, 1])] == "neuron"
    data, _ = chart(run_page("pareto.py"))
    assert "hybrid-exact-loss" in {t.name for t in data}


def test_a_runs_decode_speed_on_its_page_on_pareto_and_the_measure_button(seeded, tmp_path):
    """Speed measured for a run (as a GPU worker stores it) shows on the run's page (per context, and per layer
    beside the FLOPs kept), on the Pareto page as speedup over dense with one series per method and GPU, and the
    run's button queues a measurement that waits for a GPU worker."""
    from db.models import Run
    from jobs.results import store_run_latency

    with session_scope() as session:
        run_ids = {(r.model, r.method, r.target_flop_reduction): r.id for r in session.query(Run)}
        svd_02, svd_03 = run_ids[("smollm2-135m", "svd", 0.2)], run_ids[("smollm2-135m", "svd", 0.3)]
        session.get(Run, svd_02).artifact_path = "artifacts/fake.safetensors"  # the button needs stored adapters
    for run_id, ms in ((svd_02, 0.8), (svd_03, 0.5)):
        report = {"device_name": "NVIDIA H200", "dtype": "bfloat16", "engine": "graphs+triton",
                  "measured_flop_reduction": 0.3, "copy_bandwidth_gbs": 4270.0, "head_ms": 0.01,
                  "rows": [{"context_tokens": c, "new_tokens": 256, "ms_per_token": ms * (1 + c / 1000),
                            "dense_ms_per_token": 1.0 * (1 + c / 1000), "floor_ms": 0.1, "dense_floor_ms": 0.12,
                            "batches": [{"batch": 4, "ms_per_step": 2.0, "dense_ms_per_step": 1.6,
                                         "tokens_per_s": 2000.0, "dense_tokens_per_s": 2500.0}] if c == 1 else []}
                           for c in (1, 512)],
                  "layers": [{"layer": i, "qkv_kept": 1.0, "mlp_kept": 0.4 + 0.1 * i, "qkv_ms": 0.01,
                              "attention_ms": 0.02 + i / 100, "mlp_ms": 0.03} for i in range(2)],
                  "section_costs": {"qkv": {"fixed_ms": None, "per_kept_ms": None},
                                    "mlp": {"fixed_ms": 0.026, "per_kept_ms": 0.059}}}
        with session_scope() as session:
            store_run_latency(session, run_id, report)

    at = AppTest.from_file(str(PAGES / "run_detail.py"), default_timeout=30)
    at.query_params["run"] = str(svd_02)
    at.run()
    assert not at.exception, at.exception
    speed = {m.label: (m.value, m.delta) for m in at.metric if "context" in m.label}
    assert speed == {"NVIDIA H200 · bfloat16 · context 1": ("0.801 ms/token", "1.25× dense (1.001 ms)"),
                     "NVIDIA H200 · bfloat16 · context 512": ("1.210 ms/token", "1.25× dense (1.512 ms)")}
    # the reading of context 1: dense's 1.001 ms against its stored floor of 0.12 is 8.3× (launch-bound)
    assert any(c.value.startswith("Dense decodes at 8.3× its bandwidth floor") for c in at.caption)
    maps = heatmaps(at)
    times = maps["ms per layer section (profiled replay, context 512)"]  # a measurement's last context
    assert times["y"] == ["QKV product", "rest of attention", "MLP"]
    assert np.allclose(np.array(_decode(times["z"])), [[0.01, 0.01], [0.02, 0.03], [0.03, 0.03]])
    assert np.allclose(np.array(_decode(maps["FLOPs kept / dense (engine's masks)"]["z"])), [[1.0, 1.0], [0.4, 0.5]])
    # where a step goes: the layers' sections as points (µs against the share kept), the worker's line for the
    # MLP's cut sections from 26 µs at k = 0 to 26 + 59 at k = 1, none for QKV (no line was fitted)
    costs_chart = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                       if json.loads(c.proto.spec)["layout"]["xaxis"]["title"]["text"] == "FLOPs kept / dense (k)")
    traces = {t["name"]: (_decode(t["x"]), _decode(t["y"])) for t in costs_chart["data"]}
    assert set(traces) == {"QKV product · layers", "MLP · layers", "MLP · cut: 26.0 + 59.0·k µs"}
    assert np.allclose(traces["MLP · layers"][0], [0.4, 0.5]) and np.allclose(traces["MLP · layers"][1], [30, 30])
    assert np.allclose(traces["QKV product · layers"][1], [10, 10])
    assert np.allclose(traces["MLP · cut: 26.0 + 59.0·k µs"][0], [0, 1])
    assert np.allclose(traces["MLP · cut: 26.0 + 59.0·k µs"][1], [26, 85])
    # batches were timed at context 1 only: batch 1 from the one-token engine (1000/0.8008 and 1000/1.001), batch 4
    # as stored; run solid, dense dashed
    batch_chart = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                       if "batch" in json.loads(c.proto.spec)["layout"]["xaxis"]["title"]["text"])
    lines = {t["name"]: (t["x"], t["y"], t["line"].get("dash")) for t in batch_chart["data"]}
    assert set(lines) == {"run · NVIDIA H200 · bfloat16 · context 1", "dense · NVIDIA H200 · bfloat16 · context 1"}
    x, y, dash = lines["run · NVIDIA H200 · bfloat16 · context 1"]
    assert _decode(x) == [1, 4] and np.allclose(_decode(y), [1e3 / 0.8008, 2000.0]) and dash is None
    x, y, dash = lines["dense · NVIDIA H200 · bfloat16 · context 1"]
    assert np.allclose(_decode(y), [1e3 / 1.001, 2500.0]) and dash == "dash"
    at.text_input(key="speed_contexts").set_value("1,128")
    at.text_input(key="speed_batches").set_value("1,4")
    at.button[0].click().run()
    assert not at.exception and "batches must be a list of integers in [2, 16]" in at.error[0].value
    assert not [j for j in queue.list_jobs() if j.kind == "run_latency"]
    at.text_input(key="speed_batches").set_value("8,4")
    at.button[0].click().run()
    assert not at.exception and "Queued job" in at.success[0].value
    queued = next(j for j in queue.list_jobs() if j.kind == "run_latency")
    assert (queued.payload["run_id"], queued.payload["contexts"], queued.payload["batches"], queued.status,
            queued.message) == (svd_02, [1, 128], [4, 8], "queued", "queued; waiting for a GPU worker")

    traces, layout = chart(page_with("pareto.py", model="smollm2-135m", x="speedup"))
    points = {t.name: (t.x, t.y) for t in traces if t.name and "frontier" not in t.name and "dense" not in t.name}
    assert points == {"svd · NVIDIA H200": ([1.0 / 0.8, 1.0 / 0.5], [120.0, 337.8])}
    assert layout["xaxis"]["title"]["text"] == "decode speedup over dense (same engine, same GPU)"

    at = AppTest.from_file(str(PAGES / "compare.py"), default_timeout=30)
    at.query_params["runs"] = f"{svd_02},{svd_03}"
    at.run()
    diff = at.dataframe[1].value
    assert diff.loc["ms/token · NVIDIA H200 · bfloat16 · context 1"].tolist() == ["0.801 (1.25× dense)",
                                                                               "0.500 (2.00× dense)"]


def test_accuracy_on_tasks_on_the_run_page_pareto_and_compare(seeded):
    """Accuracy stored by an evaluate job (lm-eval's shape, adapted and dense) shows on the run's page, becomes a
    Pareto y axis where higher is better, and a Compare row; the run page's form queues an evaluation with tasks."""
    from db.models import Run
    from jobs.results import store_evaluation

    with session_scope() as session:
        run_ids = {(r.model, r.method, r.target_flop_reduction): r.id for r in session.query(Run)}
        svd_02, svd_03 = run_ids[("smollm2-135m", "svd", 0.2)], run_ids[("smollm2-135m", "svd", 0.3)]
        session.get(Run, svd_02).artifact_path = "artifacts/fake.safetensors"

    def shaped(acc):
        return {"results": {"cloze": {"alias": "cloze", "acc,none": acc, "acc_stderr,none": 0.01}},
                "n-samples": {"cloze": {"original": 1000, "effective": 1000}}, "config": {}}

    for run_id, acc in ((svd_02, 0.30), (svd_03, 0.20)):
        with session_scope() as session:
            store_evaluation(session, run_id, {"split": "heldout", "tokens": 512, "seq_len": 128, "perplexity": 1.0,
                                               "dense_perplexity": 1.0, "measured_flop_reduction": 0.2,
                                               "measured_flop_reduction_whole_model": 0.1,
                                               "tasks": {"adapted": shaped(acc), "dense": shaped(0.35)}})

    at = AppTest.from_file(str(PAGES / "run_detail.py"), default_timeout=30)
    at.query_params["run"] = str(svd_02)
    at.run()
    assert not at.exception, at.exception
    table = next(d.value for d in at.dataframe if "task" in getattr(d.value, "columns", []))
    assert table[["task", "acc", "dense_acc", "items"]].values.tolist() == [["cloze", 0.30, 0.35, 1000]]
    at.text_input(key="accuracy_tasks").set_value("cloze")
    next(b for b in at.button if b.label == "Measure accuracy").click().run()
    assert not at.exception and "Queued job" in at.success[0].value
    queued = next(j for j in queue.list_jobs() if j.kind == "evaluate")
    assert (queued.payload["run_id"], queued.payload["tasks"]) == (svd_02, ["cloze"])

    traces, layout = chart(page_with("pareto.py", model="smollm2-135m", y="cloze"))
    (svd,) = [t for t in traces if t.name == "svd"]
    assert svd.y == [0.30, 0.20]  # the two runs with cloze accuracy, by FLOP reduction (0.201, 0.300)
    dense = next(t for t in traces if t.name == "dense (reference)")
    assert dense.y == [0.35, 0.35] and layout["yaxis"]["title"]["text"] == "accuracy (higher is better)"

    at = AppTest.from_file(str(PAGES / "compare.py"), default_timeout=30)
    at.query_params["runs"] = f"{svd_02},{svd_03}"
    at.run()
    diff = at.dataframe[1].value
    assert diff.loc["accuracy · cloze"].tolist() == ["0.300 ± 0.010 (dense 0.350)", "0.200 ± 0.010 (dense 0.350)"]


def test_what_the_model_says_on_the_run_page_and_side_by_side_on_compare(seeded):
    from db.models import Run

    def said(replies, accuracy):
        return {"replies": [{"kind": "chat", "prompt": "What is the capital of France?", "reply": replies[0],
                             "answers": ["Paris"], "correct": "Paris" in replies[0]},
                            {"kind": "text", "prompt": "Once upon a time", "reply": replies[1], "answers": [],
                             "correct": None}], "chat_accuracy": accuracy}

    dense = said(["Paris.", " there was a king"], 1.0)
    with session_scope() as session:
        run_ids = {(r.model, r.method, r.target_flop_reduction): r.id for r in session.query(Run)}
        svd_02, svd_03 = run_ids[("smollm2-135m", "svd", 0.2)], run_ids[("smollm2-135m", "svd", 0.3)]
        session.get(Run, svd_02).probes = {"adapted": said(["It is Paris.", " a king"], 1.0), "dense": dense}
        session.get(Run, svd_03).probes = {"adapted": said(["\n\n", " the the"], 0.0), "dense": dense}

    at = page_with("run_detail.py", run=svd_03)
    table = next(d.value for d in at.dataframe if "dense reply" in getattr(d.value, "columns", []))
    assert table[["prompt", "dense reply", "reply", "answered"]].values.tolist() == [
        ["What is the capital of France?", "Paris.", "\n\n", False], ["Once upon a time", " there was a king",
                                                                        " the the", None]]
    assert any("Questions answered: 0% (dense 100%)" in c.value for c in at.caption)

    at = page_with("compare.py", runs=f"{svd_02},{svd_03}")
    diff = at.dataframe[1].value
    assert diff.loc["questions answered (probes)"].tolist() == ["100%", "0%"]
    side = next(d.value for d in at.dataframe if "prompt" in getattr(d.value, "columns", []))
    assert side.values.tolist() == [["What is the capital of France?", "Paris.", "It is Paris.", "\n\n"],
                                    ["Once upon a time", " there was a king", " a king", " the the"]]


def test_claims_page_gives_each_claim_a_verdict_from_the_stored_runs(db_url):
    ids = {}
    for row in (("smollm2-135m", "rana", 0.44, 0.440, 109.5, "greedy"), ("smollm2-135m", "cats", 0.44, 0.438, 976.6)):
        queue.submit("compress", {"model": "tiny", "flop_reduction": row[2]}, url=db_url)
        claimed = queue.claim("seed-worker", url=db_url)
        with session_scope(db_url) as session:
            ids[row[1]] = store_compression(session, fake_result(*row), job_id=claimed.id)
            queue.mark_done(session, claimed.id, "seed-worker")
    at = run_page("claims.py")
    text = [m.value for m in at.markdown]
    headings = [t for t in text if t.startswith("**") and "-badge[" in t]
    assert len(headings) == 5
    rana = text.index(next(t for t in headings if t.startswith("**RaNA beats neuron adapters")))
    assert ":green-badge[holds]" in text[rana]
    assert "rana 109.5 at −0.440 against cats 976.6" in text[rana + 2]
    assert text[rana + 3] == f"[The runs behind it](/compare?runs={ids['rana']},{ids['cats']})"
    a3 = text.index(next(t for t in headings if t.startswith("**A3 beats")))
    assert ":gray-badge[not testable here]" in text[a3] and text[a3 + 3].startswith("**")  # no link: no runs


def test_new_run_takes_a_users_text_and_refuses_a_bad_one_with_a_message(db_url, tmp_path):
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"body": f"document {i} " * 50}) + "\n" for i in range(30)))
    at = run_page("new_run.py")
    at.selectbox(key="new_run_model").set_value("tiny")
    at.text_input(key="new_run_corpus").set_value(str(tmp_path / "empty.txt"))
    (tmp_path / "empty.txt").write_text("")
    at.button(key="new_run_submit").click().run()
    assert "empty.txt is empty" in at.error[0].value and queue.list_jobs(url=db_url) == []
    at.text_input(key="new_run_corpus").set_value(f"{mine}:body")
    at.text_input(key="new_run_eval_corpus").set_value("brown")
    at.button(key="new_run_submit").click().run()
    assert not at.error and "Queued job" in at.success[0].value
    (job,) = queue.list_jobs(url=db_url)
    assert (job.payload["corpus"], job.payload["eval_corpus"]) == (f"{mine}:body", "brown")


def test_pareto_filters_by_the_text_runs_were_calibrated_and_evaluated_on(db_url):
    brown = {"name": "brown", "split": "every 10th document held out", "digest": "1de54bce0895e349",
             "documents": 500}
    mine = {**brown, "name": "/data/mine.jsonl", "digest": "4ce7b39134222ec5", "documents": 200}
    for i, corpora in enumerate([None, {"calibration": mine, "evaluation": brown},
                                 {"calibration": mine, "evaluation": mine}]):
        job_id = queue.submit("compress", {"model": "tiny"}, url=db_url)
        claimed = queue.claim("w", url=db_url)
        result = fake_result("tiny", "svd", 0.1 * (i + 1), 0.1 * (i + 1), 100.0 + i)
        with session_scope(db_url) as session:
            store_compression(session, result | ({"corpora": corpora} if corpora else {}), job_id=claimed.id)
            queue.mark_done(session, job_id, "w")
    at = run_page("pareto.py")
    assert at.multiselect(key="pareto_corpora").options == ["brown", "mine.jsonl #4ce7b3",
                                                            "mine.jsonl #4ce7b3 → brown"]
    at.multiselect(key="pareto_corpora").set_value(["mine.jsonl #4ce7b3 → brown"]).run()
    assert list(at.dataframe[0].value["perplexity"]) == [101.0]
    assert at.query_params["corpora"] == "mine.jsonl #4ce7b3 → brown"  # a shareable link keeps the filter
    shared = page_with("pareto.py", corpora="mine.jsonl #4ce7b3 → brown")
    assert list(shared.dataframe[0].value["perplexity"]) == [101.0]
    detail = page_with("run_detail.py", run=3)
    assert any("Calibrated on mine.jsonl #4ce7b3, evaluated on mine.jsonl #4ce7b3" in c.value for c in detail.caption)


@pytest.fixture
def team_mode(db_url, monkeypatch):
    from jobs import accounts

    monkeypatch.setenv("RANA_AUTH", "team")
    monkeypatch.setenv("RANA_SESSION_SECRET", "t" * 48)
    accounts.FAILURES.times.clear()
    for name, role in (("vera", "viewer"), ("rita", "runner"), ("ada", "admin")):
        accounts.add_user(name, f"{name}-password", role, url=db_url)
    return db_url


def signed_in(at, name, role):
    from jobs import accounts

    at.session_state["rana_session_token"] = accounts.issue_session(accounts.Actor(name, role), "t" * 48)
    return at


def test_team_mode_shows_only_the_sign_in_form_until_a_user_signs_in(team_mode):
    for page in ("new_run.py", "pareto.py", "job_list.py", "run_detail.py"):  # every page's URL, run alone too
        at = run_page(page)
        assert [t.value for t in at.title] == ["RaNA Studio"] and at.text_input(key="sign_in_name")
        assert not at.dataframe and not at.selectbox and [b.label for b in at.button] == ["Sign in"]
    at = AppTest.from_file(str(MAIN), default_timeout=30).run()
    at.text_input(key="sign_in_name").set_value("vera")
    at.text_input(key="sign_in_password").set_value("wrong-password")
    at.button[0].click().run()
    assert at.error[0].value == "wrong name or password" and not at.exception
    at.text_input(key="sign_in_password").set_value("vera-password")
    at.button[0].click().run()
    assert not at.exception and "Signed in as **vera** (viewer)" in at.sidebar.caption[0].value
    assert at.title[0].value == "Pareto"  # a viewer lands on the runs, not on a form that queues


def test_a_viewer_gets_no_form_and_a_runner_cannot_cancel_an_admins_job(team_mode):
    from jobs.accounts import Actor

    viewer = signed_in(AppTest.from_file(str(PAGES / "new_run.py"), default_timeout=30), "vera", "viewer").run()
    assert "ask an admin for the runner role" in viewer.info[0].value and not viewer.button
    admins = queue.submit("compress", {"model": "tiny"}, url=team_mode, actor=Actor("ada", "admin"))
    jobs_page = signed_in(AppTest.from_file(str(PAGES / "job_list.py"), default_timeout=30), "rita", "runner").run()
    jobs_page.selectbox(key="job_action_id").set_value(admins)
    jobs_page.button(key="job_cancel").click().run()
    assert f"job {admins} was queued by ada" in jobs_page.error[0].value
    assert queue.list_jobs(url=team_mode)[0].status == "queued"
    viewer_jobs = signed_in(AppTest.from_file(str(PAGES / "job_list.py"), default_timeout=30), "vera", "viewer").run()
    assert not viewer_jobs.button  # no cancel or retry for a viewer


def test_the_speed_reading_says_whether_a_step_waits_on_launches_or_on_bytes():
    """A SmolLM2-like measurement (dense far above its floor) is read as launch-bound, slower than dense; a
    7B-like one by the bytes its masks leave and the cut MLP sections' fixed cost; none without floors."""
    from app.readings import speed_reading

    small = {"ms_per_token": 0.4626, "dense_ms_per_token": 0.4057, "floor_ms": 0.04, "dense_floor_ms": 0.08}
    assert speed_reading(small, None) == (
        "Dense decodes at 5.1× its bandwidth floor on this GPU: a step of this model waits on kernel launches, not "
        "on its weights' bytes. The 50% of the bytes this run leaves unread buy little there, and its adapted "
        "sections' extra launches cost more: 0.88× dense (slower). A cut pays in speed where dense runs near its "
        "floor: on larger models.")
    assert speed_reading({**small, "ms_per_token": 0.4}, None).split(". ")[1] == (
        "The 50% of the bytes this run leaves unread buy little there: 1.01× dense")
    large = {"ms_per_token": 2.746, "dense_ms_per_token": 3.515, "floor_ms": 1.9, "dense_floor_ms": 3.153}
    costs = {"mlp": {"fixed_ms": 0.02, "cut_layers": 25}, "qkv": {"fixed_ms": None, "cut_layers": 0}}
    assert speed_reading(large, costs) == (
        "The run reads 60% of dense's bytes a step, so at most 1.66× dense; it decodes at 1.28×, 77% of "
        "that. The cut MLP sections cost ~20 µs each whatever they keep (their extra launches), ~0.50 ms of the "
        "2.75 ms step (the profiled replay's timing events add a few µs a section).")
    assert speed_reading(large, {"mlp": {"fixed_ms": None}}).endswith("77% of that.")
    assert speed_reading(large, {"mlp": {"fixed_ms": -0.002, "cut_layers": 25}}).endswith("77% of that.")
    more_bytes = {**large, "floor_ms": 3.5}  # factors heavier than the masks' savings (a static low rank, say)
    assert speed_reading(more_bytes, costs) == (
        "This run reads 111% of dense's bytes a step (its factors outweigh what its masks skip), so its "
        "bytes allow no speedup; it decodes at 1.28× dense.")
    assert speed_reading({**large, "floor_ms": None}, costs) is None


def test_new_run_says_what_decode_speed_was_measured_before_on_the_chosen_model(seeded):
    """Two measurements of SmolLM2 runs on one GPU (as a worker stores them): the new-run page names dense's
    median time over its floor and the fastest run, for that model only; nothing for a model never measured."""
    from db.models import Run
    from jobs.results import store_run_latency

    with session_scope() as session:
        run_ids = {(r.model, r.method, r.target_flop_reduction): r.id for r in session.query(Run)}
    for (method, budget), (ms, dense_ms) in {("svd", 0.3): (0.46, 0.40), ("rana", 0.3): (0.39, 0.41)}.items():
        report = {"device_name": "NVIDIA H200", "dtype": "bfloat16", "engine": "graphs+triton",
                  "measured_flop_reduction": budget, "copy_bandwidth_gbs": 4270.0, "head_ms": None,
                  "rows": [{"context_tokens": 1, "new_tokens": 128, "ms_per_token": ms, "dense_ms_per_token": dense_ms,
                            "floor_ms": 0.05, "dense_floor_ms": 0.0625}], "layers": [], "section_costs": None}
        with session_scope() as session:
            store_run_latency(session, run_ids[("smollm2-135m", method, budget)], report)
    at = run_page("new_run.py")
    at.selectbox(key="new_run_model").set_value("smollm2-135m").run()
    # dense over its floor: 0.40 / 0.0625 = 6.4 and 0.41 / 0.0625 = 6.56, median 6.48; fastest 0.41 / 0.39
    assert [c.value for c in at.caption if c.value.startswith("Decode speed measured before")] == [
        "Decode speed measured before on this model. On NVIDIA H200, dense smollm2-135m decoded at 6.5× its "
        "bandwidth floor (a step waits on kernel launches: expect little or no speedup from a cut); the fastest run "
        "measured so far decodes at 1.05× dense (rana at 0.30, context 1)."]
    at.selectbox(key="new_run_model").set_value("tiny").run()
    assert not [c for c in at.caption if c.value.startswith("Decode speed measured before")]


def test_prior_speed_without_floors_names_only_the_fastest_run():
    from app.readings import prior_speed

    history = [{"device_name": "NVIDIA H100", "dense_over_floor": None, "best_speedup": 1.3, "best_method": "hybrid",
                "best_budget": 0.44, "best_context": 512},
               {"device_name": "NVIDIA H200", "dense_over_floor": 1.12, "best_speedup": 1.32,
                "best_method": "rana-greedy", "best_budget": 0.44, "best_context": 1}]
    assert prior_speed("llama", history) == (
        "On NVIDIA H100 the fastest run measured so far decodes at 1.30× dense (hybrid at 0.44, context 512). On "
        "NVIDIA H200, dense llama decoded at 1.1× its bandwidth floor; the fastest run measured so far decodes at "
        "1.32× dense (rana-greedy at 0.44, context 1).")
    assert prior_speed("llama", []) is None
