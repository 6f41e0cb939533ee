"""What the tests share: hand-built attacker contexts, services read back through their logs, waiting on events.

Fixtures live in conftest.py; everything a test imports lives here.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID
from joserfc.jwk import ECKey

from pki import Identity, load_issuer
from services.local import ServiceProcess, free_ports
from shared.layout import Layout
from shared.tokens import x5t_s256
from shared.x509 import PeerIdentity

__all__ = [
    "FULL_MATRIX",
    "TLS_REFUSALS",
    "Credentials",
    "Mesh",
    "Service",
    "attacker_context",
    "authorize_by",
    "forge",
    "free_ports",
    "get",
    "identity_of",
    "leaf",
    "matrix",
    "once_for_both_modes",
    "post_token",
    "signing_key",
    "start_services",
    "token_claims",
    "wait_until",
    "write_leaf",
]

# How a refusal during the handshake looks to an httpx client under asyncio: no TLS alert, the connection
# just closes — during the handshake (ConnectError) or, with TLS 1.3, at the first read.
TLS_REFUSALS = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)


@dataclass(frozen=True)
class Credentials:
    cert: Path
    key: Path


def attacker_context(
    ca: Path, creds: Credentials | None, *, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """A client context built by hand, as an attacker would: no checks on what it presents."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    if creds is not None:
        context.load_cert_chain(creds.cert, creds.key)
    if max_version is not None:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 otherwise refuses TLS < 1.2 itself
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = max_version
    return context


def get(url: str, server_name: str, context: ssl.SSLContext, token: str | None = None) -> httpx.Response:
    """GET `url` over mTLS with `context`, asking for `server_name`; with `token` as `Authorization: Bearer`."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(verify=context, timeout=10) as client:
        return client.get(url, headers=headers, extensions={"sni_hostname": server_name})


class Service:
    """A running service, with its log read back as JSON events."""

    def __init__(self, process: ServiceProcess) -> None:
        self.process = process
        self.name, self.port = process.name, process.port
        self.url = f"https://127.0.0.1:{self.port}"

    def events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.process.output().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def mark(self) -> int:
        return len(self.events())

    def events_since(self, mark: int, event: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events()[mark:] if event is None or e.get("event") == event]

    def assert_alive(self) -> None:
        assert self.process.process is not None and self.process.process.poll() is None, f"{self.name} died"


class Mesh:
    def __init__(self, services: list[Service], layout: Layout) -> None:
        self.services = {s.name: s for s in services}
        self.layout = layout

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    def marks(self) -> dict[str, int]:
        return {name: s.mark() for name, s in self.services.items()}

    def events_since(self, marks: dict[str, int], event: str = "authz") -> dict[str, list[dict[str, Any]]]:
        return {name: s.events_since(marks[name], event) for name, s in self.services.items()}

    def credentials(self, name: str) -> Credentials:
        return Credentials(self.layout.cert(name), self.layout.key(name))


def start_services(envs: list[dict[str, str]], logs: Path) -> list[ServiceProcess]:
    return [ServiceProcess(env, logs / f"{env['MESH_NAME']}-{env['MESH_PORT']}.log") for env in envs]


def wait_until(
    condition: Callable[[], bool], timeout: float = 10.0, describe: Callable[[], str] | None = None
) -> float:
    """Seconds until `condition()` held (polled every 50 ms); fails the test if it did not within `timeout`,
    saying what `describe()` says of the state it was left in."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"still not the case after {timeout:g} s" + (f": {describe()}" if describe else ""))
        time.sleep(0.05)
    return time.monotonic() - start


def leaf(
    layout: Layout,
    *,
    uris: list[str],
    dns: Sequence[str] = (),
    ca: bool = False,
    key_cert_sign: bool = False,
) -> x509.Certificate:
    """A client certificate from our intermediate, made by hand so that it can break the X509-SVID rules."""
    issuer, now = load_issuer(layout), dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string("CN=hand-made,O=mtls-mesh"))
        .issuer_name(issuer.cert.subject)
        .public_key(KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, key_cert_sign, False, False, False), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    )
    names = [*(x509.DNSName(d) for d in dns), *(x509.UniformResourceIdentifier(u) for u in uris)]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer.key, hashes.SHA256())


KEY = ec.generate_private_key(ec.SECP256R1())  # one key for every hand-made leaf: only the certificates differ


def write_leaf(layout: Layout, cert: x509.Certificate, directory: Path, name: str) -> Credentials:
    """A hand-made leaf (followed by our intermediate) and its key, as files a TLS context can load."""
    return Credentials(*Identity(cert, KEY, [load_issuer(layout).cert]).write(directory, name))


# `make test` runs each long proof in one configuration where the others add nothing it would catch;
# `make test-full` (MESH_TEST_FULL=1) runs every combination.
FULL_MATRIX = os.environ.get("MESH_TEST_FULL") == "1"


def matrix(every: list[Any], short: list[Any]) -> list[Any]:
    """The parameters of a long proof: `every` one under `make test-full`, `short` under `make test`."""
    return every if FULL_MATRIX else short


def once_for_both_modes(layout: Layout) -> None:
    """Skip a long proof whose outcome the allow-list mode cannot change in the second mode (unless full)."""
    if not FULL_MATRIX and authorize_by(layout) != "thumbprint":
        pytest.skip("the allow-list mode does not change this long proof: run once (make test-full runs both)")


def authorize_by(layout: Layout) -> str:
    """The mode a PKI's allow-lists were rendered in: "spiffe-id" if they name identities, else "thumbprint"."""
    from shared.authz import AllowList

    return "spiffe-id" if AllowList.load(layout.allow_list("service-a")).ids else "thumbprint"


# ── user tokens ──────────────────────────────────────────────────────────────────────────────────────────────


def signing_key(kid: str | None = None) -> ECKey:
    """An ES256 key as the token service makes them (kid: its RFC 7638 thumbprint, unless given)."""
    key = ECKey.generate_key("P-256")
    return ECKey.import_key(key.as_dict(private=True), {"kid": kid or key.thumbprint(), "alg": "ES256"})


def forge(key: ECKey | None, header: dict[str, Any], claims: dict[str, Any], *, signature: bytes | None = None) -> str:
    """A compact JWS signed by hand with `key` (ES256), bypassing every check a JOSE library would make on the
    way out — an attacker's token. `signature` replaces the signature (e.g. an HMAC over the same input)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    if signature is None and key is not None:
        der = key.private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr]
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input}.{b64(signature or b'')}"


def token_claims(holder: PeerIdentity, audience: str, **overrides: Any) -> dict[str, Any]:
    """The claims the token service would sign for `holder` (alice, every scope), changed by `overrides`."""
    now = int(time.time())
    claims = {
        "iss": "spiffe://mesh.internal/token-service",
        "sub": "alice",
        "aud": audience,
        "scope": "service-a service-b service-c",
        "client_id": holder.spiffe_id,
        "cnf": {"x5t#S256": x5t_s256(holder)},
        "act": {"sub": holder.spiffe_id},
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "test",
    }
    return {**claims, **overrides}


def identity_of(creds: Credentials) -> PeerIdentity:
    return PeerIdentity.from_certificate(x509.load_pem_x509_certificate(creds.cert.read_bytes()))


def post_token(url: str, context: ssl.SSLContext, form: dict[str, str]) -> httpx.Response:
    """POST /token on the token service at `url`, over mTLS with `context` (an attacker's, or an identity's)."""
    with httpx.Client(verify=context, timeout=10) as client:
        return client.post(url + "/token", data=form, extensions={"sni_hostname": "token-service"})
