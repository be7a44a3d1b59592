"""Who is using the dashboard. Solo mode (the default): nobody signs in, and the one user may do everything.
Team mode (RANA_AUTH=team): every page shows only the sign-in form until a user signs in; their session token
(signed with RANA_SESSION_SECRET, expiring; jobs.accounts) lives in this browser session's state, and every action
passes the signed-in user to the queue, which checks their role and ownership itself."""

from __future__ import annotations

import streamlit as st

from jobs import accounts
from rana_core.errors import RanaError

TOKEN_KEY = "rana_session_token"
NOBODY = accounts.Actor(None, "viewer")  # team mode before the gate ran: may read, may not act


def gate(db_url: str) -> accounts.Actor:
    """The signed-in user, or the sign-in form and a stopped page. Solo mode: the solo user."""
    try:
        if accounts.auth_mode() == "solo":
            return accounts.SOLO
        secret = accounts.session_secret()
    except RanaError as exc:
        st.error(str(exc))
        st.stop()
    actor = accounts.read_session(st.session_state.get(TOKEN_KEY), secret, db_url)
    if actor is None:
        st.session_state.pop(TOKEN_KEY, None)
        _sign_in_form(secret, db_url)
        st.stop()
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
    st.session_state.pop(TOKEN_KEY, None)


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
                st.rerun()  # the page the link asked for (its ?run=… stays in the URL)
