"""Team mode end to end in a real browser (Debian's chromium, Playwright): a worker and the dashboard with
RANA_AUTH=team on loopback. Anonymous visits see only the sign-in form on every page's URL; a wrong password gets
a message; a viewer reads runs without a New run form or job buttons; a runner queues a `tiny` job that the worker
runs under their name, cannot cancel an admin's job, stays signed in across a reload, and signs out; a deep link
survives the sign-in. Screenshots under tests/artifacts/team-*.png."""

import re

import pytest

from jobs import accounts, queue
from jobs.accounts import Actor
from test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, running_studio, wait_for

SECRET = "browser-test-secret-" + "x" * 30


@pytest.fixture
def team_studio(db_url, tmp_path):
    for name, role in (("vera", "viewer"), ("rita", "runner"), ("ada", "admin")):
        accounts.add_user(name, f"{name}-password", role, url=db_url)
    with running_studio(db_url, tmp_path, RANA_AUTH="team", RANA_SESSION_SECRET=SECRET) as url:
        yield url


def sign_in(page, name, password):
    page.get_by_role("textbox", name="Name").fill(name)
    page.get_by_role("textbox", name="Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def test_team_mode_in_a_browser(team_studio, db_url):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    admins = queue.submit("compress", {"model": "tiny", "method": "svd", "calib_tokens": 1024, "eval_tokens": 512,
                                       "seq_len": 128}, priority=-1, url=db_url, actor=Actor("ada", "admin"))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)

        for path in ("", "/pareto", "/job_list", "/run_detail?run=1", "/compare"):  # anonymous: the form only
            page.goto(team_studio + path)
            expect(page.get_by_role("button", name="Sign in")).to_be_visible()
            expect(page.get_by_role("heading", name="RaNA Studio")).to_be_visible()
            assert page.get_by_role("heading", name="New run").count() == 0
            assert page.get_by_role("heading", name="Jobs").count() == 0
        page.screenshot(path=ARTIFACTS / "team-anonymous.png", full_page=True)

        sign_in(page, "vera", "not-her-password")
        expect(page.get_by_text("wrong name or password")).to_be_visible()
        page.screenshot(path=ARTIFACTS / "team-wrong-password.png", full_page=True)

        sign_in(page, "vera", "vera-password")  # a viewer reads: no form that queues, no job buttons
        expect(page.get_by_text("Signed in as vera (viewer)")).to_be_visible()
        expect(page.get_by_role("heading", name="Compare")).to_be_visible()  # the page this URL asked for
        assert page.get_by_role("link", name="New run").count() == 0
        page.goto(team_studio)
        expect(page.get_by_role("heading", name="Pareto")).to_be_visible()  # the first page a viewer may see
        page.goto(f"{team_studio}/job_list")
        expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
        expect(page.get_by_text(re.compile(r"queued: \d+ · running: \d+"))).to_be_visible()  # the table read
        assert page.get_by_role("button", name="Cancel").count() == 0
        page.screenshot(path=ARTIFACTS / "team-viewer.png", full_page=True)
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("button", name="Sign in")).to_be_visible()

        sign_in(page, "rita", "rita-password")  # a runner queues a job through the form
        expect(page.get_by_text("Signed in as rita (runner)")).to_be_visible()
        page.goto(team_studio)
        expect(page.get_by_role("heading", name="New run")).to_be_visible()
        page.get_by_role("combobox", name="Model").click()
        page.get_by_role("option", name="tiny", exact=True).click()
        for label, value in (("Calibration tokens", "1024"), ("Evaluation tokens", "512"),
                             ("Sequence length", "128")):
            field = page.get_by_role("spinbutton", name=label, exact=True)
            expect(field).to_have_count(1)  # a rerun's stale copy of the form has gone
            field.fill(value)
            field.press("Enter")
        page.get_by_role("button", name="Queue job").click()
        expect(page.get_by_text("Queued job")).to_be_visible()
        page.screenshot(path=ARTIFACTS / "team-runner-queued.png", full_page=True)
        ritas = next(j for j in queue.list_jobs(url=db_url) if j.id != admins)
        assert ritas.author == "rita"
        done = wait_for(lambda: next((j for j in queue.list_jobs(url=db_url)
                                      if j.id == ritas.id and j.status in ("done", "failed")), None), 240,
                        "the runner's job to finish")
        assert done.status == "done", done.error

        page.reload()  # the session outlives a reload (its cookie)
        expect(page.get_by_text("Signed in as rita (runner)")).to_be_visible()
        page.goto(f"{team_studio}/job_list")
        expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
        page.get_by_role("combobox", name="Job").click()
        page.get_by_role("option", name=f"{admins} (", exact=False).click()
        page.get_by_role("button", name="Cancel").click()
        expect(page.get_by_text(f"job {admins} was queued by ada")).to_be_visible()
        page.screenshot(path=ARTIFACTS / "team-runner-refused.png", full_page=True)
        assert next(j for j in queue.list_jobs(url=db_url) if j.id == admins).status != "cancelled"
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("button", name="Sign in")).to_be_visible()
        page.reload()  # signed out for good: the cookie went too
        expect(page.get_by_role("button", name="Sign in")).to_be_visible()
        page.screenshot(path=ARTIFACTS / "team-signed-out.png", full_page=True)

        page.goto(f"{team_studio}/run_detail?run={done.run_id}")  # a deep link survives the sign-in
        sign_in(page, "vera", "vera-password")
        expect(page.get_by_role("heading", name="Run detail")).to_be_visible()
        assert page.url.endswith(f"run={done.run_id}")
        page.screenshot(path=ARTIFACTS / "team-deep-link.png", full_page=True)
        browser.close()
    for name in ("anonymous", "wrong-password", "viewer", "runner-queued", "runner-refused", "signed-out",
                 "deep-link"):
        assert (ARTIFACTS / f"team-{name}.png").stat().st_size > 5_000
