"""Team mode's accounts: Argon2 hashes, sign-in with a slow-down after failures, signed expiring sessions, and
roles and ownership enforced where jobs are queued, cancelled and retried (not only hidden in the pages)."""

import os
import subprocess
import sys

import pytest
from sqlalchemy import select

from db.models import User
from db.session import session_scope
from jobs import accounts, queue
from jobs.accounts import Actor, AuthError
from rana_core.errors import RanaError

SECRET = "s" * 40
TINY = {"model": "tiny", "method": "svd", "flop_reduction": 0.3}


@pytest.fixture
def team(db_url):
    accounts.FAILURES.times.clear()
    for name, role in (("vera", "viewer"), ("rita", "runner"), ("rob", "runner"), ("ada", "admin")):
        accounts.add_user(name, f"{name}-password", role, url=db_url)
    return db_url


def test_passwords_are_stored_as_argon2_hashes_and_checked(team):
    with session_scope(team) as session:
        stored = session.execute(select(User.password_hash).where(User.name == "rita")).scalar()
    assert stored.startswith("$argon2id$") and "rita-password" not in stored
    assert accounts.sign_in("rita", "rita-password", team) == Actor("rita", "runner")
    with pytest.raises(AuthError, match="wrong name or password"):
        accounts.sign_in("rita", "rita-passwort", team)
    with pytest.raises(AuthError, match="wrong name or password"):  # an unknown name reads the same
        accounts.sign_in("nobody", "rita-password", team)
    accounts.set_password("rita", "a-new-password", team)
    with pytest.raises(AuthError):
        accounts.sign_in("rita", "rita-password", team)
    assert accounts.sign_in("rita", "a-new-password", team).role == "runner"
    accounts.set_disabled("rita", True, team)
    with pytest.raises(AuthError, match="disabled"):
        accounts.sign_in("rita", "a-new-password", team)


def test_bad_accounts_are_refused_in_one_line(team):
    with pytest.raises(RanaError, match="at least 8 characters"):
        accounts.add_user("sam", "short", "viewer", team)
    with pytest.raises(RanaError, match="unknown role 'boss'"):
        accounts.add_user("sam", "long-enough", "boss", team)
    with pytest.raises(RanaError, match="exists already"):
        accounts.add_user("rita", "long-enough", "viewer", team)
    with pytest.raises(RanaError, match="no user 'sam'"):
        accounts.set_role("sam", "admin", team)


def test_five_failures_in_a_minute_make_that_name_wait(team):
    now = [1000.0]
    clock = lambda: now[0]  # noqa: E731
    for _ in range(5):
        with pytest.raises(AuthError, match="wrong name or password"):
            accounts.sign_in("rob", "guess", team, clock=clock)
    now[0] += 10
    with pytest.raises(AuthError, match=r"too many failed sign-ins for 'rob': try again in 50 s"):
        accounts.sign_in("rob", "rob-password", team, clock=clock)  # even the right password waits
    assert accounts.sign_in("rita", "rita-password", team, clock=clock).name == "rita"  # other names do not
    now[0] += 51
    assert accounts.sign_in("rob", "rob-password", team, clock=clock).name == "rob"


def test_sessions_are_signed_expire_and_follow_the_account(team):
    now = [5000.0]
    clock = lambda: now[0]  # noqa: E731
    token = accounts.issue_session(Actor("rita", "runner"), SECRET, seconds=60, clock=clock)
    assert accounts.read_session(token, SECRET, team, clock=clock) == Actor("rita", "runner")
    body, signature = token.split(".")
    forged = accounts.issue_session(Actor("ada", "admin"), "another-secret-of-forty-characters!!!!!", clock=clock)
    assert accounts.read_session(forged, SECRET, team, clock=clock) is None  # signed under another secret
    assert accounts.read_session(f"{forged.split('.')[0]}.{signature}", SECRET, team, clock=clock) is None
    assert accounts.read_session("garbage", SECRET, team, clock=clock) is None
    accounts.set_role("rita", "viewer", team)  # a changed role takes effect at once
    assert accounts.read_session(token, SECRET, team, clock=clock) == Actor("rita", "viewer")
    now[0] += 61
    assert accounts.read_session(token, SECRET, team, clock=clock) is None  # expired
    fresh = accounts.issue_session(Actor("rita", "viewer"), SECRET, clock=clock)
    accounts.set_disabled("rita", True, team)
    assert accounts.read_session(fresh, SECRET, team, clock=clock) is None


def test_the_queue_checks_role_and_owner(team):
    rita, rob, vera, ada = (Actor("rita", "runner"), Actor("rob", "runner"), Actor("vera", "viewer"),
                            Actor("ada", "admin"))
    with pytest.raises(AuthError, match="vera \\(viewer\\) may not queue compress jobs"):
        queue.submit("compress", TINY, url=team, actor=vera)
    mine = queue.submit("compress", TINY, author="ada", url=team, actor=rita)  # never under another's name
    admins = queue.submit("compress", TINY, url=team, actor=ada)
    assert [j.author for j in queue.list_jobs(url=team)] == ["ada", "rita"]
    with pytest.raises(AuthError, match=f"job {admins} was queued by ada: only they or an admin may cancel it"):
        queue.cancel(admins, url=team, actor=rita)
    with pytest.raises(AuthError, match="may not cancel"):
        queue.cancel(mine, url=team, actor=vera)
    with pytest.raises(AuthError):
        queue.cancel(mine, url=team, actor=rob)
    assert queue.cancel(mine, url=team, actor=rita) == 1
    with pytest.raises(AuthError, match="only they or an admin may retry it"):
        queue.retry(mine, url=team, actor=rob)
    assert queue.retry(mine, url=team, actor=rita) == 1
    assert queue.cancel(mine, url=team, actor=ada) == 1  # an admin manages every job
    assert {j.id: j.status for j in queue.list_jobs(url=team)} == {mine: "cancelled", admins: "queued"}


def rana(*args, env, stdin=None):
    return subprocess.run([sys.executable, "-m", "rana_cli.main", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=120)


def test_the_cli_manages_accounts_and_records_the_os_user_in_team_mode(tmp_path):
    env = {**os.environ, "RANA_DB_URL": f"sqlite:///{tmp_path / 'u.db'}", "RANA_DATA_DIR": str(tmp_path),
           "USER": "alice"}
    assert rana("db", "upgrade", env=env).returncode == 0
    assert rana("user", "add", "ada", "--role", "admin", "--password-stdin", env=env, stdin="ada-password\n"
                ).returncode == 0
    refused = rana("user", "role", "ada", "boss", env=env)
    assert refused.returncode == 2 and refused.stderr.strip() == \
        "rana: error: unknown role 'boss': use one of viewer, runner, admin"
    assert rana("user", "disable", "ada", env=env).returncode == 0
    assert rana("user", "list", env=env).stdout.split() == ["ada", "admin", "disabled"]
    team = {**env, "RANA_AUTH": "team"}
    assert rana("submit", "--model", "tiny", "--author", "mallory", env=team).returncode == 0
    assert rana("submit", "--model", "tiny", "--author", "bob", env=env).returncode == 0
    assert [j.author for j in queue.list_jobs(url=env["RANA_DB_URL"])] == ["bob", "alice"]


@pytest.mark.parametrize("mode, args, message", [
    ("solo", ["--address", "0.0.0.0"], "solo mode has no sign-in: serving on 0.0.0.0"),
    ("team", [], "team mode needs RANA_SESSION_SECRET"),
    ("party", [], "RANA_AUTH='party': use solo or team"),
])
def test_the_app_refuses_to_serve_unsafely(tmp_path, mode, args, message):
    env = {**os.environ, "RANA_DB_URL": f"sqlite:///{tmp_path / 'u.db'}", "RANA_AUTH": mode}
    env.pop(accounts.SECRET_ENV, None)
    for command in ("app", "up"):
        proc = rana(command, *args, env=env)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_the_served_app_hides_the_developer_menu_and_a_teams_tracebacks(monkeypatch):
    from rana_cli.serve import app_command

    def option(command, name):
        return command[command.index(name) + 1]

    monkeypatch.setenv("RANA_AUTH", "solo")
    solo = app_command(8501, "127.0.0.1")
    assert option(solo, "--client.toolbarMode") == "minimal" and option(solo, "--client.showErrorDetails") == "full"
    monkeypatch.setenv("RANA_AUTH", "team")
    team = app_command(8501, "0.0.0.0")
    assert option(team, "--client.toolbarMode") == "minimal" and option(team, "--client.showErrorDetails") == "type"


def test_an_identity_providers_user_maps_to_the_account_of_their_email(team):
    accounts.add_user("grace@example.com", None, "runner", url=team)  # `rana user add … --oidc`: no password
    assert accounts.actor_for_identity("grace@example.com", team) == Actor("grace@example.com", "runner")
    with pytest.raises(AuthError, match="wrong name or password"):  # no password signs in to such an account
        accounts.sign_in("grace@example.com", "!oidc", team)
    with pytest.raises(AuthError, match=r"no account for eve@example.com: ask an admin"):
        accounts.actor_for_identity("eve@example.com", team)
    with pytest.raises(AuthError, match="gave no email"):
        accounts.actor_for_identity(None, team)
    accounts.set_disabled("grace@example.com", True, team)
    with pytest.raises(AuthError, match="disabled"):
        accounts.actor_for_identity("grace@example.com", team)


def test_the_auth_section_of_streamlits_secrets_is_parsed_or_refused_in_one_line():
    from app.auth import oidc_providers

    base = {"redirect_uri": "https://studio.example.com/oauth2callback", "cookie_secret": "c" * 32}
    google = {"client_id": "id", "client_secret": "s", "server_metadata_url": "https://accounts.example.com/.well"}
    assert oidc_providers(None) == [] and oidc_providers({}) == []
    assert oidc_providers({**base, **google}) == [None]
    assert oidc_providers({**base, "okta": google, "google": google}) == ["okta", "google"]
    with pytest.raises(RanaError, match=r"\[auth\] in .streamlit/secrets.toml needs cookie_secret"):
        oidc_providers({"redirect_uri": base["redirect_uri"], **google})
    with pytest.raises(RanaError, match=r"\[auth.okta\] needs client_secret, server_metadata_url"):
        oidc_providers({**base, "okta": {"client_id": "id"}})
    with pytest.raises(RanaError, match="names no provider"):
        oidc_providers(base)
