"""bench/quality.py end to end on `tiny`: every method and budget becomes a row of the table and of the JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quality_benchmark_writes_every_row(tmp_path):
    out = tmp_path / "quality.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality.py"), "--model", "tiny", "--budgets", "0.3,0.6",
         "--calib-tokens", "1024", "--eval-tokens", "512", "--seq-len", "128", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=True)
    report = json.loads(out.read_text())
    rows = report["rows"]
    names = [(r["method"], r["allocation"], r["target"]) for r in rows]
    assert names[0] == ("dense", "uniform", 0.0)
    assert ("rana", "greedy", 0.6) in names and ("svd", "uniform", 0.3) in names
    assert ("a3", "uniform", 0.3) in names and ("a3", "greedy", 0.6) in names
    cats_06 = next(r for r in rows if r["method"] == "cats" and r["target"] == 0.6)
    assert "CATS can remove at most" in cats_06["skipped"]  # beyond its reach: reported, not hidden
    measured = [r for r in rows if "perplexity" in r and r["method"] != "dense"]
    assert all(abs(r["measured_flop_reduction"] - r["target"]) <= 0.02 for r in measured)
    assert all(r["measured_flop_reduction_whole_model"] < r["measured_flop_reduction"] for r in measured)
    assert set(report["flops"]) == {"measured_flop_reduction", "measured_flop_reduction_whole_model"}
    assert "rana-greedy" in proc.stdout and "skipped" in proc.stdout


def test_a_model_that_cannot_load_is_one_line_not_a_traceback(tmp_path):
    """As `make bench-quality` meets gemma3-270m on a machine without its package."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--model", str(tmp_path / "absent"),
                           "--out", str(tmp_path / "q.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("bench/quality.py: ")
    assert "not run:" in proc.stderr and not (tmp_path / "q.json").exists()


def test_a_recovered_row_reports_perplexity_and_flops_before_and_after(tmp_path):
    out = tmp_path / "quality.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality.py"), "--model", "tiny", "--budgets", "0.3", "--methods",
         "rana-uniform+recover-uniform", "--calib-tokens", "1024", "--eval-tokens", "512", "--seq-len", "128",
         "--out", str(out)], capture_output=True, text=True, timeout=600, check=True)
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["method"], row["allocation"], row["target"]) == ("rana+recover", "uniform/uniform", 0.3)
    assert row["perplexity"] < row["perplexity_before"]  # LoRA recovered some of the loss
    assert abs(row["measured_flop_reduction_before"] - 0.3) <= 0.02
    assert row["measured_flop_reduction"] < row["measured_flop_reduction_before"]  # unmerged LoRA costs FLOPs
    assert len(row["lora_ranks"]) == 2 and set(row["lora_ranks"]) == {8}


def test_a_misspelt_method_is_one_line_before_any_model_loads(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--model", "tiny", "--methods",
                           "svd,quantize-4bit", "--out", str(tmp_path / "q.json")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("bench/quality.py: unknown method 'quantize': use one of dense, svd")
    assert not (tmp_path / "q.json").exists()
