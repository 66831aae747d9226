"""Bearer-token authentication with roles, checked by the call pipeline.

Off unless ``auth_tokens_file`` is set. The file (typically a Kubernetes
Secret mounted read-only) holds one token per line::

    # role[,role...]  token                      [name]
    writer            3q2+7w...                  deploy-pipeline
    reader,writer     9f8a1c...                  dashboard
    admin             c0ffee...                  oncall

Blank lines and ``#`` comments are ignored; ``name`` (default ``token-<line>``)
is what logs show, never the token. Clients send ``authorization: Bearer
<token>`` metadata. The file is re-read when its modification time changes
(checked at most every :data:`RELOAD_INTERVAL` seconds), so a rotated Secret
takes effect without a restart; a file that becomes unreadable or invalid
keeps the last good tokens and logs why.

Roles: ``writer`` may create events, ``reader`` may list and watch them,
``admin`` may do everything (delete, and any method added later). Each
method's role is part of its policy (:mod:`activity_events.grpc.pipeline`).
A call with no token or an unknown token fails with UNAUTHENTICATED; a known
token without the method's role fails with PERMISSION_DENIED, before its
request is even parsed. Health is always open (probes carry no tokens);
reflection is open or needs a valid token of any role, as
``auth_reflection`` says.

Tokens are compared in constant time (:func:`hmac.compare_digest` over
SHA-256 digests, against every configured token), so response timing tells
an attacker nothing about how much of a guess was right.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from activity_events.domain.errors import PermissionDenied, Unauthenticated

logger = logging.getLogger(__name__)

Role = Literal["writer", "reader", "admin"]
ROLES: frozenset[str] = frozenset({"writer", "reader", "admin"})

ANY_TOKEN = "any"  # noqa: S105 - a role name, not a secret
"""The "role" of methods any valid token may call (reflection, unless open)."""

RELOAD_INTERVAL = 5.0
"""Seconds between checks of the token file's modification time."""

BEARER = "bearer "


class TokenFileError(ValueError):
    """The token file cannot be read or has a malformed line (the message never holds a token)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a token belongs to: a name for logs and the roles it grants."""

    name: str
    roles: frozenset[str]

    def may(self, role: str) -> bool:
        return "admin" in self.roles or role in self.roles


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    principal: Principal


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, source: str = "token file") -> list[tuple[str, Principal]]:
    """``(token, principal)`` pairs from the token file's text; TokenFileError on a bad line."""
    entries: list[tuple[str, Principal]] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) not in (2, 3):
            raise TokenFileError(
                f"{source} line {number}: expected 'role[,role...] token [name]', "
                f"got {len(parts)} fields"
            )
        roles = frozenset(r.strip().lower() for r in parts[0].split(",") if r.strip())
        unknown = roles - ROLES
        if not roles or unknown:
            raise TokenFileError(
                f"{source} line {number}: unknown role(s) {sorted(unknown) or '(none)'}; "
                f"use {sorted(ROLES)}"
            )
        token = parts[1]
        if len(token) < 16:
            raise TokenFileError(f"{source} line {number}: token shorter than 16 characters")
        if token in seen:
            raise TokenFileError(f"{source} line {number}: token repeated from an earlier line")
        seen.add(token)
        name = parts[2] if len(parts) == 3 else f"token-{number}"
        entries.append((token, Principal(name, roles)))
    if not entries:
        raise TokenFileError(f"{source} holds no tokens; every call would be refused")
    return entries


class TokenTable:
    """The tokens of one file, reloaded when the file changes."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._entries: tuple[_Entry, ...] = ()
        self._mtime: int | None = None
        self._checked = 0.0
        self.load()

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the loaded tokens (only digests of the tokens themselves are kept)."""
        return tuple(e.principal.name for e in self._entries)

    def load(self) -> None:
        """Read the file now; TokenFileError if it is unreadable or invalid."""
        try:
            stat = os.stat(self.path)
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenFileError(
                f"cannot read token file {self.path}: {type(exc).__name__}"
            ) from None
        parsed = parse_tokens(text, str(self.path))
        self._entries = tuple(_Entry(_digest(t), p) for t, p in parsed)
        self._mtime = stat.st_mtime_ns
        self._checked = self._clock()
        logger.info("auth: %d tokens loaded from %s", len(self._entries), self.path)

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked < RELOAD_INTERVAL:
            return
        self._checked = now
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError as exc:
            logger.warning("auth: token file %s unreadable (%s); keeping the last tokens",
                           self.path, type(exc).__name__)  # fmt: skip
            return
        if mtime == self._mtime:
            return
        try:
            self.load()
        except TokenFileError as exc:
            self._mtime = mtime  # do not retry a broken file on every call
            logger.error("auth: %s; keeping the last good tokens", exc)

    def lookup(self, token: str) -> Principal | None:
        """The principal of ``token``, comparing against every entry in constant time."""
        self._maybe_reload()
        presented = _digest(token)
        found: Principal | None = None
        for entry in self._entries:
            if hmac.compare_digest(presented, entry.digest):
                found = entry.principal
        return found


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of the ``authorization: Bearer <token>`` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        if text[: len(BEARER)].lower() == BEARER:
            token = text[len(BEARER) :].strip()
            return token or None
        return None
    return None


class Authenticator:
    """Checks a call's bearer token against the method's role (module docstring)."""

    def __init__(self, table: TokenTable, *, reflection_open: bool = False) -> None:
        self.table = table
        self.reflection_open = reflection_open

    def check(self, method: str, role: str, metadata: Iterable[tuple[str, Any]] | None) -> None:
        """Raise Unauthenticated or PermissionDenied unless the metadata carries a
        token with ``role`` (``ANY_TOKEN``: any valid token) for ``method``."""
        token = bearer_token(metadata)
        principal = self.table.lookup(token) if token is not None else None
        if principal is None:
            reason = "missing bearer token" if token is None else "unknown bearer token"
            logger.info("auth: refused %s: %s", method, reason)
            raise Unauthenticated(reason)
        if role != ANY_TOKEN and not principal.may(role):
            logger.info("auth: refused %s for %s: needs role %s", method, principal.name, role)
            raise PermissionDenied(f"{method.rpartition('/')[2]} needs role {role}")


def authenticator(tokens_file: Path | None, *, reflection: str = "token") -> Authenticator | None:
    """The authenticator for the settings, or ``None`` when auth is off (no tokens file).

    Raises TokenFileError at start-up when the file is unreadable or invalid:
    a server meant to be protected must not start open.
    """
    if tokens_file is None:
        return None
    return Authenticator(TokenTable(tokens_file), reflection_open=reflection == "open")
