"""Allow-list files: who may call one service, as `make pki` renders them from the policy.

A line names a caller in one of two ways — a pin or a name:

    3b0f…64 hex digits…9a1c            # service-a   (one certificate: its SHA-256 thumbprint)
    spiffe://mesh.internal/service-a   # service-a   (any valid certificate our CA issued for that name)

A pin survives a CA that wrongly issues a second certificate for the same name; a name survives rotation,
replicas and short-lived certificates. `pki/policy.toml`'s `authorize_by` picks which `make pki` writes;
files may mix both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.packed import Pins
from shared.x509.certs import normalise_thumbprint
from shared.x509.files import MaterialError, read_protected
from shared.x509.spiffe import InvalidSpiffeId, SpiffeId

__all__ = ["AllowList"]

# A comment starts at a '#' that begins the line or follows white space: `spiffe://x/y#z` stays one
# (invalid) value instead of quietly becoming `spiffe://x/y`.
_COMMENT = re.compile(r"(?<!\S)#")


@dataclass(frozen=True)
class AllowList:
    """The callers one service admits, each with the name its comment gives it.

    Thumbprints may be written with colons and in upper case (`3B:0F:…`, as `openssl x509 -fingerprint`
    prints). Any other content is an error, never skipped: a line we cannot read might have been meant to
    deny someone.
    """

    source: Path
    entries: Mapping[str, str]  # thumbprint → label (packed: an allow-list may be 100,000 lines long)
    ids: Mapping[SpiffeId, str] = field(default_factory=dict)  # SPIFFE ID → label

    @classmethod
    def load(cls, path: Path) -> AllowList:
        """Read and check `path`, or raise MaterialError naming the file (and line) and the fix."""
        data = read_protected(path, "allow-list")
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            raise MaterialError(f"{path}: allow-list is not UTF-8 text ({e})") from None
        thumbprints: dict[str, str] = {}
        ids: dict[SpiffeId, str] = {}
        # Lines end at "\n" only: str.splitlines() would also break at U+0085, U+2028, … which editors and `cat`
        # show inside a comment, so that a comment could smuggle in an entry nobody sees (found by fuzzing).
        for number, line in enumerate(text.split("\n"), 1):
            comment = _COMMENT.search(line)
            value = (line[: comment.start()] if comment else line).strip()
            label = line[comment.end() :].strip() if comment else ""
            if not value:
                continue
            try:
                if value.startswith("spiffe:"):
                    ids[SpiffeId.parse(value)] = label
                else:
                    thumbprints[normalise_thumbprint(value)] = label
            except (ValueError, InvalidSpiffeId) as e:
                what = "not a SPIFFE ID" if value.startswith("spiffe:") else ""
                raise MaterialError(
                    f"{path}:{number}: {what + ': ' if what else ''}{e} — fix or delete the line"
                ) from None
        return cls(path, Pins(thumbprints), ids)

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self.entries

    def label(self, sha256: str) -> str:
        return self.entries.get(sha256) or sha256[:16]
