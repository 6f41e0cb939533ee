"""`policy.toml`: which identities exist, and who may call whom — the mesh's whole authorization, as data."""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pki.authority import PKIError
from shared.tokens import TOKEN_SERVICE
from shared.x509 import InvalidSpiffeId, SpiffeId

__all__ = ["POLICY_FILE", "Policy", "check_identity_name"]

POLICY_FILE = Path(__file__).with_name("policy.toml")
AUTHORIZE_BY = ("thumbprint", "spiffe-id")
MIN_CRL_LIFETIME = dt.timedelta(seconds=10)
# These file names belong to the CA itself; an identity may not take them.
RESERVED_NAMES = frozenset(
    {"ca", "intermediate", "crl", "allow", "next", "previous", "metrics", "revocations", "rollover"}
)
# An identity's name becomes its DNS SAN and the last segment of its SPIFFE ID: one lowercase DNS label, so
# that no two names can match each other (DNS matching ignores case) and no name can smuggle in a path.
IDENTITY_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def parse_duration(text: str, key: str = "leaf_lifetime") -> dt.timedelta:
    """ "90d", "1h", "3m", "30s" → a timedelta; ValueError for anything else."""
    match = re.fullmatch(r"([0-9]+)([dhms])", text.strip()) if isinstance(text, str) else None
    if not match or int(match.group(1)) == 0:
        raise ValueError(f'{key} = {text!r}: write a whole number and a unit, like "90d", "1h", "3m"')
    unit = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}[match.group(2)]
    return dt.timedelta(**{unit: int(match.group(1))})


def _names(value: Any, key: str) -> tuple[str, ...]:
    """A TOML list of strings; ValueError naming `key` for anything else (a bare string would split into letters)."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f'{key} = {value!r}: write a list of names in quotes, like ["service-a"]')
    return tuple(value)


def _loopback_sans(value: object) -> bool:
    """The policy's loopback_sans, unless the deployment overrides it: MESH_LOOPBACK_SANS=false is set where no
    service is reached as localhost (the Docker pki job and renewer, `make k8s-secrets`)."""
    value = os.environ.get("MESH_LOOPBACK_SANS", value)
    if value in (True, "true"):
        return True
    if value in (False, "false"):
        return False
    raise ValueError(f"loopback_sans = {value!r} (or MESH_LOOPBACK_SANS): write true or false")


# Every key the policy may have, by table; anything else is a mistake (a misspelled key would be ignored).
KEYS: dict[str, tuple[str, ...]] = {
    "": (
        "trust_domain",
        "authorize_by",
        "leaf_lifetime",
        "crl_lifetime",
        "loopback_sans",
        "services",
        "clients",
        "metrics",
        "allow",
        "tokens",
    ),
    "tokens": ("edges", "lifetime", "users"),
}


def _refuse_unknown_keys(path: Path, text: str, data: dict[str, Any]) -> None:
    for table, known in KEYS.items():
        keys = data.get(table, {}) if table else data
        for key in keys if isinstance(keys, dict) else ():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean `{close[0]}`?" if close else f"the keys here are {', '.join(known)}"
                where = f"[{table}] " if table else ""
                raise PKIError(f"{path}:{_line_of(text, key, table)}: unknown {where}key `{key}` — {hint}")


def _line_of(text: str, key: str, table: str) -> int | str:
    """The line that sets `key` in `[table]` ("": before any table), or that opens it as `[table.key]`."""
    current, dotted = "", f"{table}.{key}" if table else key
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if header := re.fullmatch(r"\[\s*([^\]]+?)\s*\]", stripped):
            current = header.group(1)
            if current == dotted:
                return number
        elif current == table and re.match(rf'"?{re.escape(key)}"?\s*[=.]', stripped):
            return number
    return "?"


def _toml_error_line(error: tomllib.TOMLDecodeError, text: str) -> int | str:
    """The line to look at. tomllib names where it noticed: for an unfinished statement (a list not closed, a
    missing value) that is the start of the next line, one past the mistake — then name the last line with
    something on it before."""
    match = re.search(r"at line (\d+), column (\d+)", str(error))
    if not match:
        return "?"
    line, column = int(match.group(1)), int(match.group(2))
    if column == 1 and line > 1:
        lines = text.split("\n")
        for number in range(line - 1, 0, -1):
            if lines[number - 1].strip() and not lines[number - 1].strip().startswith("#"):
                return number
    return line


def check_identity_name(name: str) -> None:
    if name in RESERVED_NAMES or not IDENTITY_NAME.fullmatch(name):
        raise PKIError(
            f"{name!r} cannot be an identity name: use lowercase letters, digits and '-' (a DNS label), "
            f"such as 'billing', and none of {', '.join(sorted(RESERVED_NAMES))}"
        )


@dataclass(frozen=True)
class Policy:
    """`policy.toml`: which identities exist and who may call whom."""

    trust_domain: str
    services: tuple[str, ...]
    clients: tuple[str, ...]
    allow: dict[str, tuple[str, ...]]
    metrics: tuple[str, ...] = ()
    # How allow-lists name callers: "thumbprint" pins one certificate; "spiffe-id" names the identity, so
    # rotation, replicas and short-lived certificates need no allow-list change.
    authorize_by: str = "thumbprint"
    # How long a leaf certificate lives; the renewer (`python -m pki renew --watch`) re-issues it at half.
    leaf_lifetime: dt.timedelta = dt.timedelta(days=90)
    # User tokens ([tokens]): who may ask for one in a user's name, each user's scopes, how long a token lives.
    edges: tuple[str, ...] = ()
    users: dict[str, tuple[str, ...]] = field(default_factory=dict)
    token_lifetime: dt.timedelta = dt.timedelta(minutes=5)
    # How long a CRL is valid; the renewer re-signs every CRL whose CA key we hold at half of it.
    crl_lifetime: dt.timedelta = dt.timedelta(days=30)
    # Whether services' certificates also carry DNS:localhost and IP:127.0.0.1, for a mesh on one machine.
    loopback_sans: bool = True

    @classmethod
    def load(cls, path: Path = POLICY_FILE) -> Policy:
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise PKIError(f"{path}: no such policy file") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            said = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
            raise PKIError(f"{path}:{_toml_error_line(e, text)}: {said} — not valid TOML") from None
        _refuse_unknown_keys(path, text, data)
        try:
            tokens = data.get("tokens", {})
            policy = cls(
                trust_domain=data["trust_domain"],
                services=_names(data["services"], "services"),
                clients=_names(data.get("clients", []), "clients"),
                allow={callee: _names(callers, f"allow.{callee}") for callee, callers in data["allow"].items()},
                metrics=_names(data.get("metrics", []), "metrics"),
                authorize_by=data.get("authorize_by", "thumbprint"),
                leaf_lifetime=parse_duration(data.get("leaf_lifetime", "90d")),
                edges=_names(tokens.get("edges", []), "tokens.edges"),
                users={user: _names(v, f"tokens.users.{user}") for user, v in tokens.get("users", {}).items()},
                token_lifetime=parse_duration(tokens.get("lifetime", "5m"), "[tokens] lifetime"),
                crl_lifetime=parse_duration(data.get("crl_lifetime", "30d"), "crl_lifetime"),
                loopback_sans=_loopback_sans(data.get("loopback_sans", True)),
            )
        except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as e:
            raise PKIError(f"{path}: not a valid policy ({type(e).__name__}: {e}); see pki/policy.toml") from None
        if policy.crl_lifetime < MIN_CRL_LIFETIME:
            raise PKIError(
                f"{path}: crl_lifetime = {data['crl_lifetime']!r} is too short: the renewer re-signs a CRL at half "
                f"its life, checking once a second; give it at least {MIN_CRL_LIFETIME.seconds} s"
            )
        if policy.authorize_by not in AUTHORIZE_BY:
            raise PKIError(f"{path}: authorize_by = {policy.authorize_by!r}: use one of {', '.join(AUTHORIZE_BY)}")
        if not isinstance(policy.trust_domain, str):
            raise PKIError(f'{path}: trust_domain = {policy.trust_domain!r}: write it in quotes, like "mesh.internal"')
        try:
            SpiffeId.parse(policy.spiffe_id("x"))
        except InvalidSpiffeId as e:
            raise PKIError(f"{path}: trust_domain = {policy.trust_domain!r} cannot make SPIFFE IDs: {e}") from None
        known = set(policy.services) | set(policy.clients)
        named = [name for callee, callers in policy.allow.items() for name in (callee, *callers)]
        for name in [*named, *policy.metrics, *policy.edges]:
            if name not in known:
                raise PKIError(f"{path}: {name!r} is named in the policy but is neither in services nor in clients")
        for name in sorted(known):
            try:
                check_identity_name(name)
            except PKIError as e:
                raise PKIError(f"{path}: {e}") from None
        for user, scopes in policy.users.items():
            if not IDENTITY_NAME.fullmatch(user):
                raise PKIError(f"{path}: user {user!r}: use lowercase letters, digits and '-', such as 'alice'")
            if unknown := [scope for scope in scopes if scope not in policy.services]:
                raise PKIError(
                    f"{path}: user {user!r} may reach {unknown[0]!r}, which is not a service: "
                    "a user's scopes name the services a request on their behalf may reach"
                )
        return policy

    def may_call(self) -> dict[str, tuple[str, ...]]:
        """caller → the services it may call: [allow] read the other way round (what a token may be minted for)."""
        callees: dict[str, list[str]] = {}
        for callee, callers in self.allow.items():
            for caller in callers if callee != TOKEN_SERVICE else ():  # no token is ever minted for it
                callees.setdefault(caller, []).append(callee)
        return {caller: tuple(sorted(names)) for caller, names in sorted(callees.items())}

    def spiffe_id(self, name: str) -> str:
        return f"spiffe://{self.trust_domain}/{name}"
