"""Bearer tokens: stored as SHA-256 hashes, one owner per token, re-read when they change.

The tokens file (``$SPARKORCH_HOME/api-tokens.json`` or ``SPARKORCH_API_TOKENS_FILE``) maps
owner names to the hex SHA-256 of their token: ``{"alice": "9f86d0…"}``. ``sparkctl token
create NAME`` adds (or replaces) one and prints the plain token once, ``sparkctl token list``
names the owners, ``sparkctl token revoke NAME`` removes one; each edit replaces the file
atomically, mode 0600 (orchestrator.tokens has the file's format and its editing). The
plain token never touches the disk of the service, except the one ``make run`` writes for its
user (``$SPARKORCH_HOME/api-token``, mode 0600).

The running service needs no restart for an edit: :class:`ReloadingTokenRegistry` looks at
the file's mtime, size and inode when a request authenticates, at most every
``RELOAD_CHECK_S`` seconds, and loads it again when they changed. So a revoked token answers
401, and a new one is accepted, within that time. A file that does not load then (malformed
JSON, a plain token instead of a hash) is logged as an error and the last good tokens stay in
force, so a bad edit locks nobody out; at start, a malformed file is an error.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.tokens import (
    HASH_PATTERN,
    OWNER_PATTERN,
    TokenConfigError,
    hash_token,
    issue_token,
    parse_tokens,
    read_tokens_file,
)

__all__ = [
    "HASH_PATTERN",
    "OWNER_PATTERN",
    "RELOAD_CHECK_S",
    "ReloadingTokenRegistry",
    "TokenConfigError",
    "TokenRegistry",
    "hash_token",
    "issue_token",
]

logger = logging.getLogger(__name__)

RELOAD_CHECK_S = 0.25


@dataclass(frozen=True)
class TokenRegistry:
    """``sha256(token) -> owner``."""

    owners_by_hash: dict[str, str]

    @classmethod
    def load(cls, path: Path, extra: dict[str, str] | None = None) -> TokenRegistry:
        """The tokens file (if any) plus ``extra`` (``SPARKORCH_API_TOKENS``)."""
        owners_by_hash: dict[str, str] = {}
        for owners in (read_tokens_file(path), parse_tokens(extra or {}, "SPARKORCH_API_TOKENS")):
            owners_by_hash.update({digest: owner for owner, digest in owners.items()})
        return cls(owners_by_hash)

    def owner_of(self, token: str) -> str | None:
        digest = hash_token(token)
        for known, owner in self.owners_by_hash.items():
            if hmac.compare_digest(known, digest):
                return owner
        return None


FileSignature = tuple[int, int, int, int] | None


def _signature(path: Path) -> FileSignature:
    """What changes when the file is edited or replaced; None when it cannot be seen."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_dev)


class ReloadingTokenRegistry:
    """The tokens file's :class:`TokenRegistry`, loaded again when the file changes.

    Safe across the server's threads: the check runs under a lock, at most every
    ``check_every_s`` seconds; between checks, a lookup costs no system call.
    """

    def __init__(
        self,
        path: Path,
        extra: dict[str, str] | None = None,
        *,
        check_every_s: float = RELOAD_CHECK_S,
    ) -> None:
        self.path = path
        self.extra = dict(extra or {})
        self.check_every_s = check_every_s
        self._lock = threading.Lock()
        self._seen = _signature(path)  # before reading: a change in between is seen next time
        self._registry = TokenRegistry.load(path, self.extra)
        self._checked = time.monotonic()

    def owner_of(self, token: str) -> str | None:
        return self.current().owner_of(token)

    def current(self) -> TokenRegistry:
        """The registry, after loading the file again if it changed since it was last seen."""
        if time.monotonic() - self._checked >= self.check_every_s:
            with self._lock:
                if time.monotonic() - self._checked >= self.check_every_s:
                    self._refresh()
        return self._registry

    def _refresh(self) -> None:
        self._checked = time.monotonic()
        seen = _signature(self.path)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            registry = TokenRegistry.load(self.path, self.extra)
        except TokenConfigError as error:
            kept = len(self._registry.owners_by_hash)
            logger.error("%s; the %d tokens loaded before stay in force", error, kept)
            return
        self._registry = registry
        logger.info(
            "tokens file %s loaded again: %d tokens", self.path, len(registry.owners_by_hash)
        )
