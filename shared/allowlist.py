"""Allow-list files: the thumbprints that may call one service, as `make pki` renders them from the policy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.certs import normalise_thumbprint
from shared.files import MaterialError, read_protected

__all__ = ["AllowList"]


@dataclass(frozen=True)
class AllowList:
    """The thumbprints that may call one service, each with the name its comment gives it.

    File format (rendered by `make pki` from pki/policy.toml):

        # comment lines and blank lines are ignored
        3b0f…64 hex digits…9a1c  # service-a spiffe://mesh.internal/service-a

    Colons and upper case are accepted (`3B:0F:…`, as `openssl x509 -fingerprint` prints). Any other
    content is an error, never skipped: a line we cannot read might have been meant to deny someone.
    """

    source: Path
    entries: Mapping[str, str]  # thumbprint → label

    @classmethod
    def load(cls, path: Path) -> AllowList:
        """Read and check `path`, or raise MaterialError naming the file (and line) and the fix."""
        data = read_protected(path, "allow-list")
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            raise MaterialError(f"{path}: allow-list is not UTF-8 text ({e})") from None
        return cls(path, parse_allow_list(text, path))

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self.entries

    def label(self, sha256: str) -> str:
        return self.entries.get(sha256) or sha256[:16]


def parse_allow_list(text: str, source: Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        value, _, comment = line.partition("#")
        if not value.strip():
            continue
        try:
            sha256 = normalise_thumbprint(value)
        except ValueError as e:
            raise MaterialError(f"{source}:{number}: {e} — fix or delete the line, then restart") from None
        entries[sha256] = comment.strip()
    return entries
