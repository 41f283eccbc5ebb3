"""Who is calling: bearer tokens checked against the farm's users.

The users are the keys file's (re-read whenever it changes, so adding one needs
no restart) and, with RENDERFARM_TOKEN set, one admin named `admin`. A farm with
neither is open: every caller is the admin `anonymous`. rpc.CallerGuard asks
here on every call but the health service's, which stays open.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path

from renderfarm._constants import AUTHORIZATION_KEY, BEARER_PREFIX
from renderfarm.cluster.config_file import ConfigError
from renderfarm.cluster.keys import User, load_users, token_sha256

log = logging.getLogger(__name__)

TOKEN_ADMIN = "admin"
# Not a valid SHA-256 of anything a caller could send: the open farm's user is never matched by a token.
ANONYMOUS = User("anonymous", "0" * 64, role="admin")


class Users:
    def __init__(self, keys_file: Path | None, token: str | None):
        """Reads the keys file now: one that is missing or broken at start is a ConfigError."""
        self._keys_file = keys_file
        self._token_users = [User(TOKEN_ADMIN, token_sha256(token), role="admin")] if token else []
        self.open = keys_file is None and not token
        # (inode, mtime, size) of the keys file as last read: a change of any means read it again.
        self._stamp: tuple | None = None
        self._by_name: dict[str, User] = {}
        self._by_digest: list[tuple[bytes, User]] = []
        self._adopt(self._token_users)
        if keys_file is not None:
            self._refresh(strict=True)

    def _adopt(self, users: list[User]) -> None:
        self._by_name = {user.name: user for user in users}
        self._by_digest = [(bytes.fromhex(user.token_sha256), user) for user in users]

    def _refresh(self, strict: bool = False) -> None:
        try:
            status = os.stat(self._keys_file)
        except OSError as error:
            if strict:
                raise ConfigError(f"keys file {self._keys_file}: {error.strerror}") from None
            return  # a Secret's mount swaps its files; keep the users until it is back
        stamp = (status.st_ino, status.st_mtime_ns, status.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            users = load_users(self._keys_file)
            if clash := {user.name for user in users} & {user.name for user in self._token_users}:
                raise ConfigError(f"{self._keys_file.name}: the name {clash.pop()!r} is RENDERFARM_TOKEN's admin")
        except ConfigError as error:
            if strict:
                raise
            log.error("%s; the farm keeps the users it had", error)
            return
        self._adopt(self._token_users + users)
        log.info("keys file %s: %d users", self._keys_file, len(users))

    def authenticate(self, metadata) -> User | None:
        """The user whose token the call's metadata carries; None if it carries none, or one nobody has."""
        if self.open:
            return ANONYMOUS
        if self._keys_file is not None:
            self._refresh()
        sent = dict(metadata or ()).get(AUTHORIZATION_KEY, "")
        if not sent.startswith(BEARER_PREFIX):
            return None
        digest = hashlib.sha256(sent[len(BEARER_PREFIX) :].encode()).digest()
        found = None
        for expected, user in self._by_digest:
            # Constant time, and every user compared: the time taken says nothing about any token.
            if hmac.compare_digest(digest, expected):
                found = user
        return found

    def get(self, name: str) -> User | None:
        """A user by name: a resumed job's owner, for their current weight."""
        if self._keys_file is not None:
            self._refresh()
        return self._by_name.get(name)
