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
from rana_core.errors import RanaError

TOKEN_KEY = "rana_session_token"
COOKIE = "rana_session"
COOKIE_WRITTEN, SIGNED_OUT = "rana_cookie_written", "rana_signed_out"
NOBODY = accounts.Actor(None, "viewer")  # team mode before the gate ran: may read, may not act


def signed_in(db_url: str) -> accounts.Actor | None:
    """The signed-in user (solo mode: the solo user), or None; shows nothing."""
    try:
        if accounts.auth_mode() == "solo":
            return accounts.SOLO
        secret = accounts.session_secret()
    except RanaError:
        return None  # gate() says why
    return accounts.read_session(_token(), secret, db_url)


def _token() -> str | None:
    token = st.session_state.get(TOKEN_KEY)
    if token is None and not st.session_state.get(SIGNED_OUT):  # a reload, or a link opened in this browser
        token = st.context.cookies.get(COOKIE)
    return token


def gate(db_url: str) -> accounts.Actor:
    """The signed-in user, or the sign-in form and a stopped page. Solo mode: the solo user."""
    try:
        if accounts.auth_mode() == "solo":
            return accounts.SOLO
        secret = accounts.session_secret()
    except RanaError as exc:
        st.error(str(exc))
        st.stop()
    token = _token()
    actor = accounts.read_session(token, secret, db_url)
    if actor is None:
        st.session_state.pop(TOKEN_KEY, None)
        if st.session_state.pop(COOKIE_WRITTEN, False) or st.session_state.get(SIGNED_OUT):
            _write_cookie("", 0)  # expired, revoked or signed out: the browser forgets it too
        _sign_in_form(secret, db_url)
        st.stop()
    st.session_state[TOKEN_KEY] = token
    if not st.session_state.get(COOKIE_WRITTEN):
        _write_cookie(token, accounts.SESSION_SECONDS)
        st.session_state[COOKIE_WRITTEN] = True
    return actor


def actor() -> accounts.Actor:
    """Who acts, for the queue's checks (read again from the token, so a revoked account stops at once)."""
    if accounts.auth_mode() == "solo":
        return accounts.SOLO
    from app.data import url  # noqa: PLC0415  (data imports this module)

    token = st.session_state.get(TOKEN_KEY)
    try:
        return accounts.read_session(token, accounts.session_secret(), url()) or NOBODY
    except RanaError:
        return NOBODY


def sign_out() -> None:
    """End the session: the token is dropped here, and the cookie is cleared on the sign-in page that follows
    (the cookie this connection was opened with is ignored from now on)."""
    st.session_state.pop(TOKEN_KEY, None)
    st.session_state[SIGNED_OUT] = True


def _write_cookie(token: str, seconds: int) -> None:
    st.html(f"<script>document.cookie = '{COOKIE}={token}; path=/; max-age={seconds}; SameSite=Strict';</script>",
            unsafe_allow_javascript=True)


def _sign_in_form(secret: str, db_url: str) -> None:
    st.title("RaNA Studio")
    st.caption("Sign in to see the team's runs.")
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
                st.session_state.pop(COOKIE_WRITTEN, None)  # the next run writes the new token's cookie
                st.rerun()  # the page the link asked for (its ?run=… stays in the URL)
