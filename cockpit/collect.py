"""Read the mesh as the operator sees it: every service over mTLS (GET /status, services/status.py) and the
PKI on disk (pki/out and the policy), into typed, immutable records. No judgement here: cockpit.status
decides what is well; a live view (issue 23) can poll `collect` and draw the same records.

    targets = local_targets([8443, 8444, 8445, 8446])            # or parse_targets(["service-a=https://…"])
    mesh = collect(targets, Layout(Path("pki/out")), Path("pki/policy.toml"))
    for service in mesh.services:
        service.error or service.certificate.not_after            # unreachable: the sentence why
    mesh.reference.trust_anchors                                   # what pki/out says everyone should hold
    mesh.as_json()                                                 # the same, for scripts

Every call reads afresh (one request per service, a new connection each) and never raises for a service it
cannot read: that service's `error` says why. Only a PKI it cannot read at all (no operator credentials)
raises `MaterialError`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pki import ledger
from pki.allowlists import expected_allow_lists
from pki.check import check
from pki.policy import POLICY_FILE, Policy
from pki.renewal import renewal_due
from services.local import CHAIN
from shared import tls
from shared.authz import authorize_id
from shared.layout import Layout
from shared.outbound import callee_check, explain_transport_error, sync_transport
from shared.tokens import TOKEN_SERVICE
from shared.x509 import (
    InvalidSvid,
    MaterialError,
    SpiffeId,
    authority_key_id,
    crl_number,
    load_certificates,
    load_crls,
    svid_id,
    thumbprint,
)

__all__ = [
    "AllowListState",
    "Certificate",
    "Crl",
    "MeshStatus",
    "Reference",
    "ServiceStatus",
    "SigningKeys",
    "Target",
    "collect",
    "local_targets",
    "parse_targets",
]

SERVICES = (*CHAIN, TOKEN_SERVICE)  # in the order of `make run`'s PORTS=A,B,C,T
OPERATOR = "operator"  # the identity the cockpit reads as: on allow/metrics.txt (policy.toml's `metrics`)


@dataclass(frozen=True)
class Target:
    """A service to read: its identity (the name its certificate must carry, the SNI) and its base URL."""

    name: str
    url: str


@dataclass(frozen=True)
class Certificate:
    serial: str  # hex
    spiffe_id: str | None
    sha256: str | None
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    renewal_due: dt.datetime  # when the renewer replaces it (half its life, pki.renewal)


@dataclass(frozen=True)
class Crl:
    issuer: str
    issuer_key_id: str  # hex: the CA is named by its key, never by its name
    number: int
    last_update: dt.datetime
    next_update: dt.datetime | None
    revoked: tuple[str, ...]  # serials, hex


@dataclass(frozen=True)
class AllowListState:
    file: str  # e.g. service-a.txt, metrics.txt
    mode: str  # thumbprint, spiffe-id, mixed, empty
    entries: frozenset[str]  # thumbprints and SPIFFE IDs


@dataclass(frozen=True)
class SigningKeys:
    """The token service's JWT signing keys (key ids): the one signing now, the one taking over next."""

    current: str
    next: str
    next_signs_at: dt.datetime
    published: tuple[str, ...]


@dataclass(frozen=True)
class ServiceStatus:
    target: Target
    error: str | None = None  # why it could not be read; every other field is then empty
    answered: int | None = None  # with an error: the HTTP status it answered with, if it answered at all
    generation: int | None = None  # how many times it has (re)built its TLS contexts
    certificate: Certificate | None = None
    trust_anchors: tuple[str, ...] = ()  # SHA-256 of each CA certificate it trusts
    crls: tuple[Crl, ...] = ()
    allow_lists: dict[str, AllowListState] = field(default_factory=dict)  # by file name
    signing_keys: SigningKeys | None = None  # the token service only

    @property
    def reachable(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Reference:
    """What pki/out and the policy say every service should hold now."""

    pki_dir: Path
    trust_anchors: tuple[str, ...]
    crls: tuple[Crl, ...]
    allow_lists: dict[str, AllowListState]  # as the policy renders them, by file name
    identities: dict[str, str]  # serial (hex) → identity name, from the ledger (issued.json)
    error: str | None = None  # why pki/out could not be read as a reference
    # What `pki check` finds wrong with pki/out (a CRL from a stray key, one behind the revocation record, …): a
    # reference that is itself wrong makes every "equal to pki/out" line worthless, so each is a ✖ of its own.
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class MeshStatus:
    at: dt.datetime
    services: tuple[ServiceStatus, ...]
    reference: Reference

    def revoked(self) -> dict[str, str]:
        """Every serial a CRL in force on some service revokes → the identity it was issued to (or "?")."""
        serials = {serial for s in self.services for crl in s.crls for serial in crl.revoked}
        serials |= {serial for crl in self.reference.crls for serial in crl.revoked}
        return {serial: self.reference.identities.get(serial, "?") for serial in sorted(serials)}

    def as_json(self) -> dict[str, Any]:
        return _plain({**asdict(self), "revoked": self.revoked()})


def local_targets(ports: Sequence[int], host: str = "127.0.0.1") -> list[Target]:
    """The mesh of `make run` (and the Docker mesh's published ports): A, B, C and the token service, in order."""
    if len(ports) != len(SERVICES):
        raise ValueError(f"give {len(SERVICES)} ports, for {', '.join(SERVICES)}: got {len(ports)}")
    return [Target(name, f"https://{host}:{port}") for name, port in zip(SERVICES, ports, strict=True)]


def parse_targets(specs: Sequence[str]) -> list[Target]:
    """NAME=URL, e.g. service-a=https://mesh.example:8443."""
    targets = []
    for spec in specs:
        name, _, url = spec.partition("=")
        if not name or not url.startswith("https://"):
            raise ValueError(f"{spec!r}: give NAME=URL, e.g. service-a=https://127.0.0.1:8443")
        targets.append(Target(name, url.rstrip("/")))
    return targets


def collect(
    targets: Sequence[Target],
    layout: Layout,
    policy_path: Path = POLICY_FILE,
    operator: str = OPERATOR,
    timeout: float = 5.0,
    pki_check: bool = True,
) -> MeshStatus:
    """Read every target as `operator` (its certificate and key in `layout`) and the reference from `layout`.

    `pki_check=False` leaves out `pki check`'s findings (`Reference.problems`): the whole doctor loads every
    identity (~0.2 s), which a one-off status pays and a view polling every few seconds, showing no findings, need not.
    """
    material = layout.material(operator, with_crl=False)  # our own CRL must not stop us reading a service
    material.check()
    context = tls.client_context(material)
    domain = _trust_domain(layout.cert(operator))
    services = tuple(_read_service(t, context, domain, timeout) for t in targets)
    return MeshStatus(dt.datetime.now(dt.UTC), services, read_reference(layout, policy_path, pki_check=pki_check))


def read_reference(layout: Layout, policy_path: Path = POLICY_FILE, *, pki_check: bool = True) -> Reference:
    """pki/out as the reference: its trust anchors, its CRLs, the allow-lists its policy renders, its ledger."""
    try:
        policy = Policy.load(policy_path)
        anchors = tuple(thumbprint(c) for c in load_certificates(layout.ca_cert, "CA file"))
        crls = tuple(_crl_of(crl) for crl in load_crls(layout.crl))
        expected = expected_allow_lists(layout, policy)
        identities = {e.serial: e.name for e in ledger.entries(layout)}
    except (MaterialError, ValueError, OSError) as e:
        return Reference(layout.out, (), (), {}, {}, str(e))
    allow_lists = {name: _allow_state(name, [value for value, _ in lines]) for name, lines in expected.items()}
    problems = tuple(finding.text for finding in check(layout, policy_path)) if pki_check else ()
    return Reference(layout.out, anchors, crls, allow_lists, identities, problems=problems)


def _read_service(target: Target, context: Any, domain: str, timeout: float) -> ServiceStatus:
    check = callee_check(authorize_id(SpiffeId(domain, f"/{target.name}")))
    try:
        with httpx.Client(transport=sync_transport(context, check), timeout=timeout) as client:
            response = client.get(f"{target.url}/status", extensions={"sni_hostname": target.name})
    except httpx.HTTPError as e:
        return ServiceStatus(target, explain_transport_error(e, target.name, timeout, target.url))
    if response.status_code != 200:
        detail = _detail(response)
        error = f"GET {target.url}/status answered {response.status_code}: {detail}"
        return ServiceStatus(target, error, answered=response.status_code)
    try:
        return _service_of(target, response.json())
    except (ValueError, KeyError, TypeError) as e:
        return ServiceStatus(target, f"GET {target.url}/status answered something unexpected ({e})")


def _service_of(target: Target, body: dict[str, Any]) -> ServiceStatus:
    own = body.get("certificate")
    certificate = None
    if own is not None:
        not_before, not_after = _when(own["not_before"]), _when(own["not_after"])
        certificate = Certificate(
            own["serial"],
            own.get("spiffe_id"),
            own.get("sha256"),
            own["issuer"],
            not_before,
            not_after,
            renewal_due(not_before, not_after),
        )
    keys = body.get("signing_keys")
    return ServiceStatus(
        target,
        generation=int(body["generation"]),
        certificate=certificate,
        trust_anchors=tuple(body["trust_anchors"]),
        crls=tuple(
            Crl(
                c["issuer"],
                c["issuer_key_id"],
                int(c["number"]),
                _when(c["last_update"]),
                _when(c["next_update"]) if c.get("next_update") else None,
                tuple(c["revoked"]),
            )
            for c in body["crls"]
        ),
        allow_lists={
            name: AllowListState(name, a["mode"], frozenset([*a["thumbprints"], *a["spiffe_ids"]]))
            for name, a in body["allow_lists"].items()
        },
        signing_keys=SigningKeys(keys["current"], keys["next"], _when(keys["next_signs_at"]), tuple(keys["published"]))
        if keys
        else None,
    )


def _crl_of(crl: Any) -> Crl:
    return Crl(
        crl.issuer.rfc4514_string(),
        (authority_key_id(crl) or b"").hex(),
        crl_number(crl),
        crl.last_update_utc,
        crl.next_update_utc,
        tuple(sorted(f"{entry.serial_number:x}" for entry in crl)),
    )


def _allow_state(name: str, entries: list[str]) -> AllowListState:
    ids = [e for e in entries if e.startswith("spiffe:")]
    pins = [e for e in entries if not e.startswith("spiffe:")]
    mode = "mixed" if ids and pins else "spiffe-id" if ids else "thumbprint" if pins else "empty"
    return AllowListState(name, mode, frozenset(entries))


def _trust_domain(cert: Path) -> str:
    try:
        return svid_id(load_certificates(cert)[0]).trust_domain
    except InvalidSvid as e:
        raise MaterialError(
            f"{cert}: the operator's certificate has no SPIFFE ID ({e}) — `make pki` issues one"
        ) from None


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("detail") or body) if isinstance(body, dict) else str(body)


def _when(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def _plain(value: Any) -> Any:
    """JSON-ready: datetimes as RFC 3339, sets and tuples as sorted or ordered lists, paths as strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, frozenset | set):
        return sorted(_plain(v) for v in value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dt.datetime):
        return f"{value:%Y-%m-%dT%H:%M:%SZ}"
    if isinstance(value, Path):
        return str(value)
    return value
