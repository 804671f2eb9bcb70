"""Bearer tokens: stored as SHA-256 hashes, one owner per token.

The tokens file (``$SPARKORCH_HOME/api-tokens.json`` or ``SPARKORCH_API_TOKENS_FILE``) maps
owner names to the hex SHA-256 of their token: ``{"alice": "9f86d0…"}``. The plain token
never touches the disk of the service, except the one ``make run`` writes for its user
(``$SPARKORCH_HOME/api-token``, mode 0600).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

OWNER_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
HASH_PATTERN = re.compile(r"^[0-9a-f]{64}$")


class TokenConfigError(ValueError):
    """The tokens file is unreadable or malformed."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenRegistry:
    """``sha256(token) -> owner``."""

    owners_by_hash: dict[str, str]

    @classmethod
    def load(cls, path: Path, extra: dict[str, str] | None = None) -> TokenRegistry:
        """The tokens file (if any) plus ``extra`` (``SPARKORCH_API_TOKENS``)."""
        owners: dict[str, str] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise TokenConfigError(f"tokens file {path}: {error}") from error
            owners.update(cls._parse(data, f"tokens file {path}"))
        owners.update(cls._parse(extra or {}, "SPARKORCH_API_TOKENS"))
        return cls(owners)

    @staticmethod
    def _parse(data: object, source: str) -> dict[str, str]:
        if not isinstance(data, dict):
            raise TokenConfigError(f"{source}: expected {{owner: sha256 hex}}")
        owners: dict[str, str] = {}
        for owner, digest in data.items():
            if not OWNER_PATTERN.match(str(owner)):
                raise TokenConfigError(
                    f"{source}: owner {owner!r} must match {OWNER_PATTERN.pattern}"
                )
            if not isinstance(digest, str) or not HASH_PATTERN.match(digest):
                raise TokenConfigError(
                    f"{source}: the value for {owner!r} must be the token's SHA-256 in "
                    "lowercase hex (never the token itself)"
                )
            owners[digest] = owner
        return owners

    def owner_of(self, token: str) -> str | None:
        digest = hash_token(token)
        for known, owner in self.owners_by_hash.items():
            if hmac.compare_digest(known, digest):
                return owner
        return None


def issue_token(tokens_file: Path, owner: str) -> str:
    """Create a token for ``owner`` (replacing its previous one); returns the plain token."""
    if not OWNER_PATTERN.match(owner):
        raise TokenConfigError(f"owner {owner!r} must match {OWNER_PATTERN.pattern}")
    data = json.loads(tokens_file.read_text()) if tokens_file.is_file() else {}
    token = "spk_" + secrets.token_urlsafe(32)
    data[owner] = hash_token(token)
    tokens_file.parent.mkdir(parents=True, exist_ok=True)
    partial = tokens_file.with_suffix(".tmp")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.chmod(partial, 0o600)
    partial.replace(tokens_file)
    return token
