"""The table of job kinds (jobs.kinds): every kind has its handler, its one line, and its payload validated once,
where it enters the queue; method-allocation labels are built and parsed by one pair of functions."""

import pytest

from jobs import kinds, queue, specs
from jobs.worker import Worker
from rana_core.config import CompressConfig
from rana_core.errors import RanaError
from rana_core.methods import METHODS


def test_every_kind_is_run_by_a_worker_method_or_is_a_parent_of_runnable_children():
    assert set(kinds.KINDS) == {"compress", "sweep", "evaluate", "latency", "run_latency", "recover"}
    for name, kind in kinds.KINDS.items():
        if kind.children is None:
            assert callable(getattr(Worker, kind.handler, None)), f"{name}: Worker has no {kind.handler}"
        else:
            assert kind.handler is None and kinds.KINDS[kind.child_kind].children is None
    assert kinds.PARENT_KINDS == ("sweep",)
    assert {name for name, kind in kinds.KINDS.items() if kind.needs_run} == {"evaluate", "recover", "run_latency"}
    assert set(kinds.GPU_KINDS) == {"latency", "run_latency"}


def test_the_worker_dispatches_through_the_table():
    worker = Worker(device="cpu")
    latency = queue.ClaimedJob(1, "latency", specs.latency_payload({}), attempts=1)
    with pytest.raises(RanaError, match="latency jobs need a CUDA GPU"):  # reached run_latency
        worker._execute(latency)
    with pytest.raises(RanaError, match="cannot run jobs of kind 'sweep'"):  # a parent is never run itself
        worker._execute(queue.ClaimedJob(2, "sweep", {}, attempts=1))
    with pytest.raises(RanaError, match="cannot run jobs of kind 'quantize'"):
        worker._execute(queue.ClaimedJob(3, "quantize", {}, attempts=1))


@pytest.mark.parametrize("kind, payload, line", [
    ("compress", {"model": "tiny", "method": "rana", "allocation": "greedy", "flop_reduction": 0.3},
     "tiny / rana-greedy / 0.3"),
    ("compress", {"model": "tiny", "method": "svd", "allocation": "uniform", "flop_reduction": 0.25},
     "tiny / svd / 0.25"),
    ("sweep", {"base": {"model": "tiny"}, "methods": ["rana-greedy", "cats"], "budgets": [0.2, 0.3]},
     "tiny / rana-greedy,cats / 2 budgets"),
    ("evaluate", {"run_id": 4, "split": "train", "eval_tokens": 8192, "seq_len": 512},
     "run 4 on train (8192 tokens)"),
    ("recover", {"run_id": 4, "strategy": "rankadaptor", "rank_budget": 8}, "run 4: LoRA rankadaptor at rank budget 8"),
    ("latency", {"model": "llama2-7b-shape", "dtype": "float16"}, "llama2-7b-shape / float16 (synthetic weights)"),
    ("run_latency", {"run_id": 3, "contexts": [1, 512], "new_tokens": 256, "dtype": "bfloat16"},
     "run 3: decode speed at contexts 1,512 (bfloat16)"),
    ("run_latency", {"run_id": 3, "contexts": [1], "new_tokens": 256, "dtype": "float16", "batches": [4, 8]},
     "run 3: decode speed at contexts 1, batches 4,8 (float16)"),
    ("quantize", {"bits": 4}, "(a quantize job: unknown to this version)"),
])
def test_each_kind_describes_a_job_in_one_line(kind, payload, line):
    assert kinds.describe(kind, payload) == line


def test_a_sweep_stores_its_methods_as_the_labels_it_is_plotted_under():
    clean = specs.sweep_payload({"base": {"model": "tiny"}, "methods": ["rana-greedy", "cats-uniform", "hybrid"],
                                 "budgets": [0.3]})
    assert clean["methods"] == ["rana-greedy", "cats", "hybrid-exact-loss"]


@pytest.mark.parametrize("method, allocation, label", [
    ("svd", "uniform", "svd"), ("rana", "uniform", "rana"), ("rana", "greedy", "rana-greedy"),
    ("hybrid", "exact-loss", "hybrid-exact-loss"), ("a3", "greedy", "a3-greedy"),
])
def test_method_labels_are_the_series_names_runs_always_had(method, allocation, label):
    assert specs.method_label(method, allocation) == label
    assert specs.parse_method_label(label) == (method, allocation)


def test_every_registered_method_and_allocation_survives_its_label():
    pairs = [(name, allocation) for name, spec in METHODS.items() for allocation in spec.allocations]
    assert [specs.parse_method_label(specs.method_label(*pair)) for pair in pairs] == pairs
    assert specs.parse_method_label("rana-uniform") == ("rana", "uniform")  # the spelled-out default, too


def test_an_unknown_method_label_is_one_clear_error():
    with pytest.raises(RanaError, match="unknown method 'quantize': use one of dense, svd") as caught:
        specs.parse_method_label("quantize-4bit")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("batches", [[1], [17], [4, "8"], 4, [True]])
def test_batch_sizes_of_a_speed_measurement_are_2_to_16(batches):
    with pytest.raises(RanaError, match=r"batches must be a list of integers in \[2, 16\]"):
        specs.run_latency_payload({"run_id": 3, "batches": batches})
    assert specs.run_latency_payload({"run_id": 3, "batches": [8, 4, 8]})["batches"] == [4, 8]
    assert specs.run_latency_payload({"run_id": 3})["batches"] == []


def test_a_bad_payload_is_refused_before_the_database_is_opened(tmp_path):
    absent = tmp_path / "absent.db"
    with pytest.raises(RanaError, match=r"FLOP reduction must be in \[0, 0.95\)"):
        queue.submit("compress", {"model": "tiny", "flop_reduction": 1.2}, url=f"sqlite:///{absent}")
    with pytest.raises(RanaError, match="unknown job kind 'quantize'"):
        queue.submit("quantize", {}, url=f"sqlite:///{absent}")
    assert not absent.exists()


def counting_validations(monkeypatch) -> list:
    calls = []
    original = CompressConfig.validate

    def counted(self):
        calls.append(self.flop_reduction)
        return original(self)

    monkeypatch.setattr(CompressConfig, "validate", counted)
    return calls


def test_rana_submit_validates_its_payload_once(db_url, monkeypatch, capsys):
    from rana_cli.main import main

    calls = counting_validations(monkeypatch)
    assert main(["submit", "--model", "tiny", "--flop-reduction", "0.25", "--calib-tokens", "1024",
                 "--eval-tokens", "512", "--seq-len", "128"]) == 0
    assert calls == [0.25]
    (job,) = queue.list_jobs(url=db_url)
    assert job.id == int(capsys.readouterr().out) and job.payload["flop_reduction"] == 0.25


def test_a_sweep_validates_each_of_its_points_once(db_url, monkeypatch):
    calls = counting_validations(monkeypatch)
    sweep = {"base": {"model": "tiny", "calib_tokens": 256, "eval_tokens": 256, "seq_len": 128},
             "methods": ["rana-greedy", "svd"], "budgets": [0.3, 0.2]}
    sweep_id = queue.submit("sweep", sweep, url=db_url)
    assert sorted(calls) == [0.2, 0.2, 0.3, 0.3]
    points = queue.list_jobs(url=db_url, parent_id=sweep_id)
    assert sorted((j.payload["method"], j.payload["allocation"], j.payload["flop_reduction"]) for j in points) == [
        ("rana", "greedy", 0.2), ("rana", "greedy", 0.3), ("svd", "uniform", 0.2), ("svd", "uniform", 0.3)]
    assert all(j.payload["calib_tokens"] == 256 and j.payload["dtype"] == "float32" for j in points)


def test_the_worker_trusts_a_stored_configuration_but_runs_on_its_own_device(monkeypatch):
    stored = CompressConfig(model="tiny", method="rana", allocation="greedy", flop_reduction=0.3).to_dict()
    calls = counting_validations(monkeypatch)
    config = Worker(device="cuda:1")._config(stored)
    assert calls == []
    assert (config.model, config.method, config.allocation, config.flop_reduction, config.device) == \
        ("tiny", "rana", "greedy", 0.3, "cuda:1")
    assert Worker(device=None)._config(stored).device == "cpu"  # no device of its own: the stored one
