"""The keys file: the farm's users, each with a role, a token's SHA-256, a share and quotas.

    [[users]]
    name = "alice"
    role = "member"            # or "admin": sees and cancels every job
    token_sha256 = "9f86d0..."  # only the hash is stored; `renderfarm keys add` makes the token
    weight = 3                 # share of the farm against other users with work pending (default 1)
    max_concurrent_jobs = 4    # optional quotas
    max_images_per_day = 20000

Plain standard library (no torch, no ray): `renderfarm keys` runs on an admin's laptop.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
from dataclasses import dataclass, fields
from pathlib import Path

from renderfarm.cluster.config import ConfigValueError
from renderfarm.cluster.config_file import ConfigError, from_table, read_toml

ROLES = ("member", "admin")
# Names show in job listings and log lines; keep them to what needs no quoting.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Tokens carry this prefix, so a leaked one is recognisable (secret scanners match prefixes).
TOKEN_PREFIX = "rf_"


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class User:
    name: str
    token_sha256: str
    role: str = "member"
    weight: float = 1.0
    max_concurrent_jobs: int | None = None
    max_images_per_day: int | None = None

    def __post_init__(self):
        if not NAME_PATTERN.fullmatch(self.name):
            raise ConfigValueError(
                "name", f"must be 1-64 letters, digits or ._@- , starting with a letter or digit (got {self.name!r})"
            )
        if self.role not in ROLES:
            raise ConfigValueError("role", f"must be one of {', '.join(ROLES)} (got {self.role!r})")
        if not SHA256_HEX.fullmatch(self.token_sha256):
            raise ConfigValueError("token_sha256", "must be 64 lowercase hex digits, the SHA-256 of the token")
        if not self.weight > 0:
            raise ConfigValueError("weight", f"must be above 0 (got {self.weight})")
        for key in ("max_concurrent_jobs", "max_images_per_day"):
            if (value := getattr(self, key)) is not None and value < 1:
                raise ConfigValueError(key, f"must be at least 1, or left out for no quota (got {value})")

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_see(self, owner: str) -> bool:
        """The one rule of isolation: a member sees (streams, cancels) only their own jobs; an admin, all."""
        return self.is_admin or owner == self.name


def load_users(path: Path) -> list[User]:
    """The users of a keys file. Unknown keys, wrong types, bad values and a name or token used
    twice raise ConfigError naming the entry (`keys.toml: users[2].role must be ...`)."""
    source = path.name
    try:
        table = read_toml(path)
    except OSError as error:
        raise ConfigError(f"keys file {path}: {error.strerror or error}") from None
    if set(table) - {"users"}:
        raise ConfigError(f"{source}: unknown key {sorted(set(table) - {'users'})[0]} (known: users)")
    entries = table.get("users", [])
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ConfigError(f"{source}: users must be an array of tables ([[users]])")
    users = [from_table(User, entry, source, f"users[{index}].") for index, entry in enumerate(entries)]
    for key in ("name", "token_sha256"):
        seen: set[str] = set()
        for index, user in enumerate(users):
            if getattr(user, key) in seen:
                raise ConfigError(f"{source}: users[{index}].{key} is used by an earlier user too")
            seen.add(getattr(user, key))
    return users


def add_user(path: Path, name: str, *, role: str = "member", weight: float = 1.0,
             max_concurrent_jobs: int | None = None, max_images_per_day: int | None = None) -> str:  # fmt: skip
    """Appends a new user to the keys file (created mode 0600) and returns their token, which
    exists nowhere else: the file keeps only its hash."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    try:
        user = User(name, token_sha256(token), role, float(weight), max_concurrent_jobs, max_images_per_day)
    except ConfigValueError as error:
        raise ConfigError(f"{path.name}: {error}") from None
    with _locked(path):
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        if text:
            existing = load_users(path)
            if any(other.name == name for other in existing):
                raise ConfigError(f"{path.name}: a user named {name!r} exists already")
        _replace(path, text + ("\n" if text and not text.endswith("\n") else "") + _entry(user))
    return token


def remove_user(path: Path, name: str) -> None:
    """Rewrites the keys file without the user; their token stops working once the farm sees the file change.
    The file is written afresh from its entries, so comments in it are not kept."""
    with _locked(path):
        users = load_users(path)
        if not any(user.name == name for user in users):
            raise ConfigError(f"{path.name}: no user named {name!r}")
        _replace(path, "".join(_entry(user) for user in users if user.name != name))


def _entry(user: User) -> str:
    lines = ["[[users]]"]
    for field in fields(User):
        value = getattr(user, field.name)
        if value is None or value == field.default:
            continue
        # Names and hashes match patterns that need no escaping; numbers are TOML as Python writes them.
        lines.append(f'{field.name} = "{value}"' if isinstance(value, str) else f"{field.name} = {value!r}")
    return "\n".join(lines) + "\n\n"


def _replace(path: Path, text: str) -> None:
    """Writes the whole file at once (a farm reading it never sees half), readable by its owner only."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


@contextlib.contextmanager
def _locked(path: Path):
    """Two `keys add` at once must not both append to the same old text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)
