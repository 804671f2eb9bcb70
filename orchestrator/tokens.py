"""The service's tokens file: owner names mapped to the SHA-256 of their token
(``{"alice": "9f86d0…"}``), what ``sparkctl token`` administers and ``api.auth`` reads.

Each edit holds an flock on ``<file>.lock`` and replaces the file atomically, mode 0600.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

OWNER_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
HASH_PATTERN = re.compile(r"^[0-9a-f]{64}$")
TOKEN_PREFIX = "spk_"


class TokenConfigError(ValueError):
    """The tokens file is unreadable or malformed, or has no such owner."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_owner(owner: str) -> str:
    if not OWNER_PATTERN.match(owner):
        raise TokenConfigError(f"owner {owner!r} must match {OWNER_PATTERN.pattern}")
    return owner


def parse_tokens(data: object, source: str) -> dict[str, str]:
    """``{owner: sha256 hex}``, every owner name and digest checked."""
    if not isinstance(data, dict):
        raise TokenConfigError(f"{source}: expected {{owner: sha256 hex}}")
    for owner, digest in data.items():
        if not OWNER_PATTERN.match(str(owner)):
            raise TokenConfigError(f"{source}: owner {owner!r} must match {OWNER_PATTERN.pattern}")
        if not isinstance(digest, str) or not HASH_PATTERN.match(digest):
            raise TokenConfigError(
                f"{source}: the value for {owner!r} must be the token's SHA-256 in "
                "lowercase hex (never the token itself)"
            )
    return dict(data)


def read_tokens_file(path: Path) -> dict[str, str]:
    """The file's ``{owner: sha256 hex}``; {} when there is no file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise TokenConfigError(f"tokens file {path}: {error}") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise TokenConfigError(f"tokens file {path}: {error}") from error
    return parse_tokens(data, f"tokens file {path}")


def token_owners(tokens_file: Path) -> list[str]:
    """The owners that have a token in the file, sorted."""
    return sorted(read_tokens_file(tokens_file))


def issue_token(tokens_file: Path, owner: str, *, replace: bool = True) -> str:
    """Create a token for ``owner`` (replacing its previous one unless ``replace`` is False,
    then a TokenConfigError); returns the plain token, of which only the hash is stored."""
    check_owner(owner)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with _editing(tokens_file) as owners:
        if owner in owners and not replace:
            raise TokenConfigError(
                f"{owner!r} already has a token in {tokens_file} (replace it: --replace)"
            )
        owners[owner] = hash_token(token)
    return token


def revoke_token(tokens_file: Path, owner: str) -> None:
    """Remove ``owner``'s token; a TokenConfigError when it has none."""
    with _editing(tokens_file) as owners:
        if owners.pop(owner, None) is None:
            known = ", ".join(sorted(owners)) or "none"
            raise TokenConfigError(f"no token for {owner!r} in {tokens_file} (owners: {known})")


@contextmanager
def _editing(tokens_file: Path) -> Iterator[dict[str, str]]:
    """The file's owners to change in place, written back (atomically, mode 0600) when the
    block ends without an error; one editor at a time (an flock on ``<file>.lock``)."""
    tokens_file.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(tokens_file.with_name(tokens_file.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        owners = read_tokens_file(tokens_file)
        yield owners
        _write_atomically(tokens_file, json.dumps(owners, indent=2, sort_keys=True) + "\n")
    finally:
        os.close(lock)  # releases the flock


def _write_atomically(path: Path, text: str) -> None:
    """Write a sibling file readable by its owner only, then rename it over ``path``: a
    reader sees the old file or the new one, never a part of it."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file left by a crash
        handle.write(text)
        handle.flush()
        os.fsync(fd)
    os.replace(partial, path)
