"""End to end in a real browser: Debian's chromium driven by Playwright (no browser download). A worker and the
dashboard run on loopback; a small job on `tiny` is queued through the New run form, finishes, shows up as a
point on the Pareto page, and a click on that point opens its heatmaps. Every page is saved as a screenshot
under tests/artifacts/ (git-ignored)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from jobs import queue

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.read().strip() == b"ok"
    except OSError:
        return False


@pytest.fixture
def studio(db_url, tmp_path):
    """A worker and the dashboard on a free loopback port, over the test database."""
    with running_studio(db_url, tmp_path) as url:
        yield url
    assert not healthy(url), "the dashboard outlived `rana app` (an orphaned Streamlit server)"


@contextmanager
def running_studio(db_url, tmp_path, **extra_env):
    port = free_port()
    env = {**os.environ, "RANA_DB_URL": db_url, "RANA_DATA_DIR": str(tmp_path), **extra_env}
    logs = [open(tmp_path / name, "w") for name in ("worker.log", "app.log")]
    children = [
        subprocess.Popen([sys.executable, "-m", "rana_cli.main", "worker", "--poll", "0.3"], env=env, stdout=logs[0],
                         stderr=subprocess.STDOUT),
        subprocess.Popen([sys.executable, "-m", "rana_cli.main", "app", "--port", str(port)], env=env, stdout=logs[1],
                         stderr=subprocess.STDOUT),
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(url), 90, "the dashboard to come up")
        yield url
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


def test_queue_a_job_see_it_on_pareto_and_open_its_heatmaps(studio, db_url):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)

        page.goto(studio)
        expect(page.get_by_role("heading", name="New run")).to_be_visible()
        model = page.get_by_role("combobox", name="Model")
        model.click()
        page.get_by_role("option", name="tiny", exact=True).click()
        for label, value in (("Calibration tokens", "1024"), ("Evaluation tokens", "512"),
                             ("Sequence length", "128")):
            field = page.get_by_label(label, exact=True)
            field.fill(value)
            field.press("Enter")
        page.get_by_label("Tags").fill("e2e")
        page.get_by_label("Tags").press("Enter")
        page.get_by_role("button", name="Queue job").click()
        expect(page.get_by_text("Queued job")).to_be_visible()
        page.screenshot(path=ARTIFACTS / "new_run.png", full_page=True)

        (job,) = queue.list_jobs(url=db_url)
        assert (job.payload["model"], job.payload["calib_tokens"], job.tags) == ("tiny", 1024, ("e2e",))
        page.goto(f"{studio}/job_list")
        expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
        finished = wait_for(lambda: next((j for j in queue.list_jobs(url=db_url) if j.status in ("done", "failed")),
                                         None), 240, "the job to finish")
        assert finished.status == "done", finished.error
        expect(page.get_by_text("done: 1")).to_be_visible()  # the page's own refresh saw it
        page.screenshot(path=ARTIFACTS / "jobs.png", full_page=True)

        page.goto(f"{studio}/pareto")
        points = page.locator(".js-plotly-plot .scatterlayer .trace .points path")
        expect(points).to_have_count(1)
        page.screenshot(path=ARTIFACTS / "pareto.png", full_page=True)
        box = points.first.bounding_box()  # Plotly listens on its drag layer: a real pointer at the point
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.wait_for_url("**/run_detail?run=*", wait_until="commit")  # the selection opened that run
        assert page.url.endswith(f"run={finished.run_id}")
        expect(page.get_by_role("heading", name="Run detail")).to_be_visible()
        expect(page.locator(".js-plotly-plot .heatmaplayer")).to_have_count(6)
        expect(page.get_by_text("reconstruction error ‖f−f̂‖²/‖f‖²")).to_be_visible()
        expect(page.get_by_role("heading", name="What the model says")).to_be_visible()  # the run's probes
        page.screenshot(path=ARTIFACTS / "run_detail.png", full_page=True)

        page.goto(f"{studio}/compare?runs={finished.run_id}")
        expect(page.get_by_text("Pick two or more runs")).to_be_visible()
        page.screenshot(path=ARTIFACTS / "compare.png", full_page=True)
        page.goto(f"{studio}/latency")
        expect(page.get_by_text("No latency results yet")).to_be_visible()
        page.screenshot(path=ARTIFACTS / "latency.png", full_page=True)
        page.goto(f"{studio}/claims")
        expect(page.get_by_role("heading", name="Claims")).to_be_visible()
        expect(page.get_by_text("Comparisons are at equal measured FLOPs")).to_be_visible()
        page.screenshot(path=ARTIFACTS / "claims.png", full_page=True)
        browser.close()
    for name in ("new_run", "jobs", "pareto", "run_detail", "compare", "latency", "claims"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000
