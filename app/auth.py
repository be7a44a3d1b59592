"""Who is using the dashboard. Solo mode (the default): nobody signs in, and the one user may do everything.
Team mode (RANA_AUTH=team): every page shows only the sign-in form until a user signs in; their session token
(signed with RANA_SESSION_SECRET, expiring; jobs.accounts) is kept in this browser session's state and in a
cookie, so that a reload or a shared link opened later in the same browser stays signed in until the token
expires or the user signs out; every action passes the signed-in user to the queue, which checks their role and
ownership itself.

Streamlit reads cookies (st.context.cookies, sent when the page connects) but has no call that sets one, so the
cookie is written by a line of JavaScript in the page: it cannot be HttpOnly. It holds nothing a forger can use
without the secret, and it is SameSite=Strict."""

from __future__ import annotations

import streamlit as st

from jobs import accounts
from jobs.accounts import RanaError  # the app reaches the core only through jobs

TOKEN_KEY, ACTOR_KEY = "rana_session_token", "rana_actor"
COOKIE = "rana_session"
SIGNED_OUT = "rana_signed_out"
NOBODY = accounts.Actor(None, "viewer")  # team mode before the gate ran: may read, may not act


OIDC_KEYS = ("client_id", "client_secret", "server_metadata_url")


def oidc_providers(section) -> list[str | None]:
    """The identity providers an [auth] section of .streamlit/secrets.toml configures for st.login: None for
    its default provider (the keys at the top), and the name of each [auth.NAME] sub-section. An incomplete
    section is a RanaError naming what is missing."""
    section = dict(section or {})
    if not section:
        return []
    missing = [key for key in ("redirect_uri", "cookie_secret") if not section.get(key)]
    if missing:
        raise RanaError(f"[auth] in .streamlit/secrets.toml needs {', '.join(missing)}")
    providers: list[str | None] = []
    for name, value in [(None, section), *((k, dict(v)) for k, v in section.items() if hasattr(v, "keys"))]:
        present = [key for key in OIDC_KEYS if value.get(key)]
        if present and len(present) < len(OIDC_KEYS):
            where = f"[auth.{name}]" if name else "[auth]"
            raise RanaError(f"{where} needs {', '.join(k for k in OIDC_KEYS if k not in present)}")
        if present:
            providers.append(name)
    if not providers:
        raise RanaError("[auth] in .streamlit/secrets.toml names no provider (client_id, client_secret, "
                        "server_metadata_url)")
    return providers


def _configured_providers() -> list[str | None]:
    try:
        section = st.secrets.get("auth")
    except Exception:  # noqa: BLE001  (no secrets file, Streamlit's own error types): password sign-in only
        return []
    return oidc_providers(section)


def _resolve(db_url: str) -> tuple[accounts.Actor | None, str | None, str, list[str | None]]:
    """Team mode's (signed-in user or None, the session token they came from, session secret, identity
    providers); a RanaError when the deployment is misconfigured (no secret, an incomplete [auth]) or the
    provider's user has no account."""
    secret, providers = accounts.session_secret(), _configured_providers()
    if providers and getattr(st.user, "is_logged_in", False):
        return accounts.actor_for_identity(st.user.get("email"), db_url), None, secret, providers
    token = _token()
    return accounts.read_session(token, secret, db_url), token, secret, providers


def signed_in(db_url: str) -> accounts.Actor | None:
    """The signed-in user (solo mode: the solo user), or None; shows nothing."""
    if accounts.auth_mode() == "solo":
        return accounts.SOLO
    try:
        return _resolve(db_url)[0]
    except RanaError:
        return None  # gate() says why


def _token() -> str | None:
    token = st.session_state.get(TOKEN_KEY)
    if token is None and not st.session_state.get(SIGNED_OUT):  # a reload, or a link opened in this browser
        token = st.context.cookies.get(COOKIE)
    return token


def gate(db_url: str) -> accounts.Actor:
    """The signed-in user, or the sign-in form and a stopped page. Solo mode: the solo user."""
    if accounts.auth_mode() == "solo":
        return accounts.SOLO
    try:
        actor, token, secret, providers = _resolve(db_url)
    except RanaError as exc:
        st.session_state.pop(ACTOR_KEY, None)
        st.error(str(exc))
        if getattr(st.user, "is_logged_in", False):
            st.button("Sign out of the identity provider", on_click=st.logout)
        st.stop()
    if actor is None:
        st.session_state.pop(TOKEN_KEY, None)
        st.session_state.pop(ACTOR_KEY, None)
        _write_cookie(st, "", 0)  # none, expired, revoked or signed out: the browser forgets any it holds
        _sign_in_form(secret, db_url, providers)
        st.stop()
    if token is not None:  # a token from the cookie is this session's from now on
        st.session_state[TOKEN_KEY] = token
    st.session_state[ACTOR_KEY] = actor  # who acts in this run (actor())
    return actor


def remember(user: accounts.Actor) -> None:
    """Keep the signed-in user's token in the browser's cookie (main.py, every run: an element written on some
    runs only would shift the page's elements, and Streamlit would show stale copies beside the new ones)."""
    token = st.session_state.get(TOKEN_KEY)
    if user.name is not None and token:
        _write_cookie(st.sidebar, token, accounts.SESSION_SECONDS)


def actor() -> accounts.Actor:
    """Who acts, for the queue's checks: the user the gate at the top of this run resolved from the token (every
    page opens with data.page(), which runs it), so a revoked account stops at its next click."""
    if accounts.auth_mode() == "solo":
        return accounts.SOLO
    return st.session_state.get(ACTOR_KEY, NOBODY)


def sign_out() -> None:
    """End the session: the token is dropped here, and the cookie is cleared on the sign-in page that follows
    (the cookie this connection was opened with is ignored from now on)."""
    st.session_state.pop(TOKEN_KEY, None)
    st.session_state.pop(ACTOR_KEY, None)
    st.session_state[SIGNED_OUT] = True
    if getattr(st.user, "is_logged_in", False):
        st.logout()


def _write_cookie(where, token: str, seconds: int) -> None:
    where.html(f"<script>document.cookie = '{COOKIE}={token}; path=/; max-age={seconds}; SameSite=Strict';</script>",
            unsafe_allow_javascript=True)


def _sign_in_form(secret: str, db_url: str, providers: list[str | None]) -> None:
    st.title("RaNA Studio")
    st.caption("Sign in to see the team's runs.")
    for provider in providers:  # st.login leaves for the provider and comes back signed in (st.user)
        st.button(f"Sign in with {provider or 'your identity provider'}", key=f"oidc_{provider}",
                  on_click=st.login, args=(provider,) if provider else ())
    with st.form("sign_in"):
        name = st.text_input("Name", key="sign_in_name")
        password = st.text_input("Password", type="password", key="sign_in_password")
        if st.form_submit_button("Sign in", type="primary"):
            try:
                signed_in = accounts.sign_in(name.strip(), password, db_url)
            except accounts.AuthError as exc:
                st.error(str(exc))
            else:
                st.session_state[TOKEN_KEY] = accounts.issue_session(signed_in, secret)
                st.rerun()  # the page the link asked for (its ?run=… stays in the URL)
