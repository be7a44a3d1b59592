"""Team mode's accounts, sessions and permissions: who may read, queue, cancel and retry.

Solo use (the default, ``RANA_AUTH`` unset or ``solo``) has no accounts: the app binds 127.0.0.1 and everyone who
reaches it is its one user. Team mode (``RANA_AUTH=team``) keeps users in the database with an Argon2 hash of
their password (never the password, never logged) and one role:

- ``viewer`` reads everything;
- ``runner`` also queues runs, sweeps, evaluations, latency measurements and recoveries, and cancels or retries
  the jobs they queued;
- ``admin`` does everything, other users' jobs and accounts included.

A signed-in user holds a session token: their name and an expiry, signed with HMAC-SHA256 under the deployment's
secret (``RANA_SESSION_SECRET``), so that it cannot be forged or extended without the secret. Five failed
sign-ins for one name within a minute make further tries for that name wait until the minute has passed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

from sqlalchemy import select

from db.models import USER_ROLES, User
from db.session import session_scope
from rana_core.errors import RanaError

AUTH_ENV, SECRET_ENV = "RANA_AUTH", "RANA_SESSION_SECRET"
MODES = ("solo", "team")
SESSION_SECONDS = 12 * 3600
MIN_SECRET_LENGTH = 32
MIN_PASSWORD_LENGTH = 8
FAILURES_ALLOWED, FAILURE_WINDOW = 5, 60.0


class AuthError(RanaError):
    """A sign-in refused, or an action the signed-in user's role does not allow."""


@dataclass(frozen=True)
class Actor:
    """Who asks: a signed-in user (team mode), or the one user of solo mode (role admin)."""

    name: str | None
    role: str

    def may(self, role: str) -> bool:
        return USER_ROLES.index(self.role) >= USER_ROLES.index(role)


SOLO = Actor(None, "admin")


def auth_mode() -> str:
    mode = os.environ.get(AUTH_ENV, "solo").strip().lower() or "solo"
    if mode not in MODES:
        raise RanaError(f"{AUTH_ENV}={mode!r}: use solo or team")
    return mode


def session_secret() -> str:
    """The secret that signs sessions; team mode refuses to start without a long enough one."""
    secret = os.environ.get(SECRET_ENV, "")
    if len(secret) < MIN_SECRET_LENGTH:
        raise RanaError(f"team mode needs {SECRET_ENV}, a random secret of at least {MIN_SECRET_LENGTH} characters "
                        "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)")
    return secret


# --- accounts ------------------------------------------------------------------------------------------------
def _hasher():
    from argon2 import PasswordHasher

    return PasswordHasher()


def _checked_role(role: str) -> str:
    if role not in USER_ROLES:
        raise RanaError(f"unknown role {role!r}: use one of {', '.join(USER_ROLES)}")
    return role


def _checked_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise RanaError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    return password


OIDC_ONLY = "!oidc"  # the hash of an account that signs in through an identity provider only: no password matches


def add_user(name: str, password: str | None, role: str = "viewer", url: str | None = None) -> None:
    """An account; `password` None: one that signs in only through the identity provider (its name is the email
    the provider reports)."""
    name = name.strip()
    if not name or len(name) > 100:
        raise RanaError("a user name needs 1 to 100 characters")
    digest = OIDC_ONLY if password is None else _hasher().hash(_checked_password(password))
    with session_scope(url) as session:
        if _find(session, name) is not None:
            raise RanaError(f"user {name!r} exists already")
        session.add(User(name=name, password_hash=digest, role=_checked_role(role), disabled=False))


def _find(session, name) -> User | None:
    return session.execute(select(User).where(User.name == name)).scalar()


def _user(session, name: str) -> User:
    user = _find(session, name)
    if user is None:
        raise RanaError(f"no user {name!r}")
    return user


def set_password(name: str, password: str, url: str | None = None) -> None:
    digest = _hasher().hash(_checked_password(password))
    with session_scope(url) as session:
        _user(session, name).password_hash = digest


def set_role(name: str, role: str, url: str | None = None) -> None:
    with session_scope(url) as session:
        _user(session, name).role = _checked_role(role)


def set_disabled(name: str, disabled: bool = True, url: str | None = None) -> None:
    with session_scope(url) as session:
        _user(session, name).disabled = disabled


def list_users(url: str | None = None) -> list[dict]:
    with session_scope(url) as session:
        return [{"name": u.name, "role": u.role, "disabled": u.disabled, "created_at": u.created_at}
                for u in session.execute(select(User).order_by(User.name)).scalars()]


# --- signing in ----------------------------------------------------------------------------------------------
class _Failures:
    """Failed sign-ins per name, within the last FAILURE_WINDOW seconds (this process's memory)."""

    def __init__(self):
        self.lock, self.times = threading.Lock(), {}

    def wait(self, name: str, now: float) -> float:
        """Seconds until `name` may try again (0 when it may now)."""
        with self.lock:
            recent = self.times.get(name, deque())
            while recent and now - recent[0] > FAILURE_WINDOW:
                recent.popleft()
            return FAILURE_WINDOW - (now - recent[0]) if len(recent) >= FAILURES_ALLOWED else 0.0

    def add(self, name: str, now: float) -> None:
        with self.lock:
            self.times.setdefault(name, deque()).append(now)

    def clear(self, name: str) -> None:
        with self.lock:
            self.times.pop(name, None)


FAILURES = _Failures()


def sign_in(name: str, password: str, url: str | None = None, clock=time.time) -> Actor:
    """The user `name` if `password` is theirs and the account is enabled; an AuthError of one line otherwise
    (the same for an unknown name and a wrong password, so that names cannot be probed)."""
    from argon2.exceptions import InvalidHashError, VerificationError

    now = clock()
    wait = FAILURES.wait(name, now)
    if wait > 0:
        raise AuthError(f"too many failed sign-ins for {name!r}: try again in {wait:.0f} s")
    with session_scope(url) as session:
        user = _find(session, name)
        stored = (user.password_hash, user.role, user.disabled) if user else None
    if stored is not None:
        try:
            _hasher().verify(stored[0], password)
        except (VerificationError, InvalidHashError):
            stored = None
    if stored is None or stored[2]:
        FAILURES.add(name, now)
        raise AuthError("wrong name or password" if stored is None else f"the account {name!r} is disabled")
    FAILURES.clear(name)
    return Actor(name, stored[1])


def actor_for_identity(email: str | None, url: str | None = None) -> Actor:
    """The account an identity provider's signed-in user maps to: the enabled user named by their email (added by
    an admin, e.g. `rana user add ada@example.com --role runner --oidc`). Anyone else is refused: signing in with
    a company's provider is not by itself a right to the studio."""
    if not email:
        raise AuthError("the identity provider gave no email address to match an account with")
    with session_scope(url) as session:
        user = _find(session, email)
        if user is None:
            raise AuthError(f"no account for {email}: ask an admin to add it (rana user add {email} --oidc)")
        if user.disabled:
            raise AuthError(f"the account {email!r} is disabled")
        return Actor(user.name, user.role)


def issue_session(actor: Actor, secret: str, seconds: int = SESSION_SECONDS, clock=time.time) -> str:
    body = _b64(json.dumps({"name": actor.name, "exp": int(clock()) + seconds}).encode())
    return f"{body}.{_signature(body, secret)}"


def read_session(token: str | None, secret: str, url: str | None = None, clock=time.time) -> Actor | None:
    """The user a token names, if its signature holds, it has not expired, and the account still exists and is
    enabled (their role read again, so a changed role takes effect at once); None otherwise."""
    if not token or token.count(".") != 1:
        return None
    body, signature = token.split(".")
    if not hmac.compare_digest(signature, _signature(body, secret)):
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except ValueError:
        return None
    if not isinstance(claims, dict) or not isinstance(claims.get("exp"), int) or claims["exp"] <= clock():
        return None
    with session_scope(url) as session:
        user = _find(session, claims.get("name"))
        return None if user is None or user.disabled else Actor(user.name, user.role)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signature(body: str, secret: str) -> str:
    return _b64(hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest())


# --- permissions ---------------------------------------------------------------------------------------------
def require(actor: Actor, role: str, what: str) -> None:
    if not actor.may(role):
        raise AuthError(f"{actor.name or 'you'} ({actor.role}) may not {what}: it needs the {role} role")


def require_owner(actor: Actor, job_author: str | None, job_id: int, what: str) -> None:
    """Runners manage their own jobs; admins every job."""
    require(actor, "runner", what)
    if actor.role != "admin" and job_author != actor.name:
        raise AuthError(f"job {job_id} was queued by {job_author or 'someone else'}: only they or an admin may "
                        f"{what} it")
