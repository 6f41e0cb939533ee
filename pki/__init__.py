"""The mesh's certificate authority: a root, an intermediate, and one identity per service and client.

The API is meant to be guessed::

    root = CertificateAuthority.root("mtls-mesh Root CA")
    issuing = root.intermediate("mtls-mesh Intermediate CA")
    service_b = issuing.issue("service-b", dns=["service-b"], uris=["spiffe://mesh.internal/service-b"])
    service_b.write(Path("pki/out"))          # service-b.crt (leaf, then intermediate) and service-b.key (0600)

`init()` builds the whole layout that the services, tests and docs rely on, from `policy.toml`:

    pki/out/ca.crt                  the trust anchor every service and client loads
    pki/out/<name>.crt, <name>.key  each identity: leaf followed by the intermediate; key 0600
    pki/out/allow/<service>.txt     who may call <service>: SHA-256 thumbprints, rendered from the policy

Why a root *and* an intermediate: the root key signs once and can then be kept offline; everything day to
day (identities, later revocation lists) is signed by the intermediate, which peers learn about from the
chain each leaf carries. Peers only ever trust the root.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import tempfile
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ecdsa", "rsa"]
Usage = Literal["server", "client"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

ORGANIZATION = "mtls-mesh"
POLICY_FILE = Path(__file__).with_name("policy.toml")
# MESH_PKI_DIR is the one setting every part of the project reads to find the PKI (services, client, CLI).
DEFAULT_OUT = Path(os.environ.get("MESH_PKI_DIR") or Path(__file__).with_name("out"))
# These file names belong to the CA itself; an identity may not take them.
RESERVED_NAMES = frozenset({"ca", "intermediate", "crl", "allow", "next", "previous", "metrics"})

ROOT_VALIDITY = dt.timedelta(days=3650)
INTERMEDIATE_VALIDITY = dt.timedelta(days=1825)
# Leaves are short-lived on purpose: a stolen key is worth less when its certificate dies soon.
# `init` re-issues a leaf that is this close to expiry.
LEAF_VALIDITY = dt.timedelta(days=90)
RENEW_BEFORE = dt.timedelta(days=7)
# Peers refuse a CRL past its next-update time, and with CRL checking on, that means refusing everyone.
# `init` (make pki) re-signs the CRL when it is this close; run it from cron in anything long-lived.
CRL_VALIDITY = dt.timedelta(days=30)
# How long `rotate` waits between listing the new thumbprint and presenting the new certificate, so every
# callee has re-read its allow-list first (services poll every second by default).
ROTATION_GRACE = dt.timedelta(seconds=3)

REVOCATION_REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
}
# Certificates are back-dated a little so that a peer whose clock runs slightly behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)

_EKU = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}


class PKIError(Exception):
    """Something about the PKI material or policy is wrong; the message says what and how to fix it."""


# ── thumbprints ────────────────────────────────────────────────────────────────────────────────────────


def thumbprint(cert: x509.Certificate) -> str:
    """The certificate's identity for allow-lists: SHA-256 of its DER encoding, lowercase hex, no colons.

    It equals `openssl x509 -noout -fingerprint -sha256` with the colons removed, lowercased.
    """
    return cert.fingerprint(hashes.SHA256()).hex()


def normalise_thumbprint(text: str) -> str:
    """Accept `AB:CD:…` or `abcd…` as people paste them; return the canonical lowercase form or raise."""
    candidate = text.strip().replace(":", "").lower()
    if len(candidate) != 64 or any(c not in "0123456789abcdef" for c in candidate):
        raise ValueError(f"{text.strip()!r} is not a SHA-256 thumbprint (64 hex digits, colons allowed)")
    return candidate


# ── keys and files ─────────────────────────────────────────────────────────────────────────────────────


def new_key(key_type: KeyType = "ecdsa") -> PrivateKey:
    """ECDSA P-256 by default: small, fast handshakes, supported everywhere. RSA-2048 for old peers."""
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise PKIError(f"unknown key type {key_type!r}: use 'ecdsa' or 'rsa'")


def write_file(path: Path, data: bytes, *, private: bool = False, owner: tuple[int, int] | None = None) -> None:
    """Write atomically (a reader never sees half a file); private files are created 0600 from the start.

    The file belongs to `owner` (uid, gid) if given; otherwise, when we run as root (the compose pki job),
    to whoever owns the directory: root writing into your checkout must not leave you files you cannot read.
    """
    _make_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        if owner is None and os.geteuid() == 0:
            parent = path.parent.stat()
            owner = (parent.st_uid, parent.st_gid)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_dir(path: Path) -> None:
    if path.is_dir():
        return
    _make_dir(path.parent)
    path.mkdir()
    if os.geteuid() == 0:
        parent = path.parent.stat()
        os.chown(path, parent.st_uid, parent.st_gid)


def load_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate in a PEM file, in order (for our leaves: the leaf, then the intermediate)."""
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except FileNotFoundError:
        raise PKIError(f"{path}: no such file — run `make pki` to create the PKI") from None
    except ValueError as e:
        raise PKIError(f"{path}: not a PEM certificate file ({e})") from None
    return certs


def load_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise PKIError(f"{path}: no such file — run `make pki` to create the PKI") from None
    except (ValueError, TypeError) as e:
        raise PKIError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PKIError(f"{path}: only ECDSA and RSA keys are supported")
    return key


# ── certificates ───────────────────────────────────────────────────────────────────────────────────────


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _sign(builder: x509.CertificateBuilder, key: PrivateKey) -> x509.Certificate:
    # ECDSA and RSA both sign with SHA-256 here; Ed25519 would take None, but peers support it less widely.
    return builder.sign(key, hashes.SHA256())


@dataclass
class Identity:
    """A certificate, its private key, and the chain up to (not including) the root."""

    cert: x509.Certificate
    key: PrivateKey
    chain: list[x509.Certificate] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return thumbprint(self.cert)

    def cert_pem(self) -> bytes:
        """Leaf first, then the intermediates: what a TLS peer must send so the other side can build the chain."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [self.cert, *self.chain])

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, out: Path, name: str | None = None) -> tuple[Path, Path]:
        """Write `<name>.crt` and `<name>.key` (0600) into `out`; return their paths."""
        name = name or self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
        write_file(key_path, self.key_pem(), private=True)
        write_file(cert_path, self.cert_pem())
        return cert_path, key_path

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> Identity:
        leaf, *chain = load_certificates(cert_path)
        return cls(leaf, load_key(key_path), chain)


class CertificateAuthority(Identity):
    """An identity that may sign certificates."""

    @classmethod
    def root(cls, common_name: str = "mtls-mesh Root CA", key_type: KeyType = "ecdsa") -> CertificateAuthority:
        """A self-signed root: the one certificate every peer trusts (`ca.crt`)."""
        key = new_key(key_type)
        builder = (
            _self_issued(common_name, key, ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        return cls(_sign(builder, key), key)

    def intermediate(self, common_name: str = "mtls-mesh Intermediate CA") -> CertificateAuthority:
        """A CA below this one that cannot sign further CAs (path length 0); it issues every identity."""
        key = new_key(_key_type(self.key))
        now = _now()
        builder = (
            self._builder(common_name, key, now - CLOCK_SKEW, now + INTERMEDIATE_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
        )
        return CertificateAuthority(_sign(builder, self.key), key, self._chain_below())

    def issue(
        self,
        name: str,
        *,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        uris: Sequence[str] = (),
        usages: Iterable[Usage] = ("server", "client"),
        key_type: KeyType | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Identity:
        """A leaf certificate for `name` (its Common Name), with the given SANs and extended key usages.

        Peers identify a service by its Subject Alternative Names, never by the Common Name: RFC 6125
        made CN matching legacy, and OpenSSL ignores the CN as soon as a SAN is present. The Extended Key
        Usage says what the certificate may be used for: `server` (serverAuth) lets it answer TLS
        connections, `client` (clientAuth) lets it make them. A service needs both; a client only the latter.
        """
        key = new_key(key_type or _key_type(self.key))
        now = _now()
        sans: list[x509.GeneralName] = [
            *(x509.DNSName(d) for d in dns),
            *(x509.IPAddress(ipaddress.ip_address(i)) for i in ips),
            *(x509.UniformResourceIdentifier(u) for u in uris),
        ]
        ekus = [_EKU[u] for u in usages]
        digital_signature_only = isinstance(key, ec.EllipticCurvePrivateKey)
        builder = (
            self._builder(name, key, not_before or now - CLOCK_SKEW, not_after or now + LEAF_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    # RSA key exchange (TLS 1.2 without ECDHE) needs keyEncipherment; ECDSA keys never do.
                    key_encipherment=not digital_signature_only,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        )
        if ekus:  # an empty EKU extension is invalid; leaving it out means "any use"
            builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return Identity(_sign(builder, self.key), key, self._chain_below())

    def _chain_below(self) -> list[x509.Certificate]:
        """What a certificate we sign must carry: us and our own chain, but never the root (peers have it)."""
        is_root = self.cert.subject == self.cert.issuer
        return [] if is_root else [self.cert, *self.chain]

    def _builder(
        self, common_name: str, key: PrivateKey, not_before: dt.datetime, not_after: dt.datetime
    ) -> x509.CertificateBuilder:
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        return (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=True,
        crl_sign=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _key_type(key: PrivateKey) -> KeyType:
    return "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ecdsa"


def _self_issued(common_name: str, key: PrivateKey, validity: dt.timedelta) -> x509.CertificateBuilder:
    """Subject and issuer the same: a root CA, or a self-signed leaf."""
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
    )


def self_signed(name: str, *, dns: Sequence[str] = (), key_type: KeyType = "ecdsa") -> Identity:
    """A leaf that vouches for itself: no CA of ours signed it, so every peer must refuse it."""
    key = new_key(key_type)
    builder = (
        _self_issued(name, key, LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
    return Identity(_sign(builder, key), key)


# ── the policy and the layout under pki/out ────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Policy:
    """`policy.toml`: which identities exist and who may call whom."""

    trust_domain: str
    services: tuple[str, ...]
    clients: tuple[str, ...]
    allow: dict[str, tuple[str, ...]]
    metrics: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path = POLICY_FILE) -> Policy:
        try:
            data = tomllib.loads(path.read_text())
            policy = cls(
                trust_domain=data["trust_domain"],
                services=tuple(data["services"]),
                clients=tuple(data.get("clients", ())),
                allow={callee: tuple(callers) for callee, callers in data["allow"].items()},
                metrics=tuple(data.get("metrics", ())),
            )
        except FileNotFoundError:
            raise PKIError(f"{path}: no such policy file") from None
        except (tomllib.TOMLDecodeError, KeyError, TypeError, AttributeError) as e:
            raise PKIError(f"{path}: not a valid policy ({type(e).__name__}: {e}); see pki/policy.toml") from None
        known = set(policy.services) | set(policy.clients)
        named = [name for callee, callers in policy.allow.items() for name in (callee, *callers)]
        for name in [*named, *policy.metrics]:
            if name not in known:
                raise PKIError(f"{path}: {name!r} is named in the policy but is neither in services nor in clients")
        for name in known & RESERVED_NAMES:
            raise PKIError(f"{path}: {name!r} is reserved for the CA's own files; choose another name")
        return policy

    def spiffe_id(self, name: str) -> str:
        return f"spiffe://{self.trust_domain}/{name}"


def service_sans(name: str) -> dict[str, list[str]]:
    """A service is reached by its name inside the mesh, and by localhost/127.0.0.1 when run locally."""
    return {"dns": [name, "localhost"], "ips": ["127.0.0.1"]}


@dataclass(frozen=True)
class Layout:
    """Where everything lives under the output directory. Tests, docs and Docker rely on these names."""

    out: Path = DEFAULT_OUT

    @property
    def ca_cert(self) -> Path:
        return self.out / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.out / "ca.key"

    @property
    def intermediate_cert(self) -> Path:
        return self.out / "intermediate.crt"

    @property
    def intermediate_key(self) -> Path:
        return self.out / "intermediate.key"

    def cert(self, name: str) -> Path:
        return self.out / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.out / f"{name}.key"

    @property
    def crl(self) -> Path:
        return self.out / "crl.pem"

    @property
    def revocations(self) -> Path:
        """The CA's record of every revocation; crl.pem is rendered from it and can always be re-made."""
        return self.out / "revocations.json"

    def allow_list(self, service: str) -> Path:
        return self.out / "allow" / f"{service}.txt"

    @property
    def metrics_allow_list(self) -> Path:
        """Who may read /metrics, on every service."""
        return self.out / "allow" / "metrics.txt"

    def next_cert(self, name: str) -> Path:
        """During a rotation: the new certificate, listed on allow-lists but not yet presented."""
        return self.out / "next" / f"{name}.crt"

    def next_key(self, name: str) -> Path:
        return self.out / "next" / f"{name}.key"

    def previous_cert(self, name: str) -> Path:
        """After a rotation: the old certificate, still listed until `retire`."""
        return self.out / "previous" / f"{name}.crt"

    def load_issuer(self) -> CertificateAuthority:
        """The intermediate, which signs every identity."""
        return CertificateAuthority.load(self.intermediate_cert, self.intermediate_key)


def _needs_renewal(path: Path) -> bool:
    if not path.exists():
        return True
    leaf = load_certificates(path)[0]
    return leaf.not_valid_after_utc - RENEW_BEFORE < _now()


def init(
    layout: Layout = Layout(),
    policy: Policy | None = None,
    *,
    key_type: KeyType = "ecdsa",
    force: bool = False,
) -> list[str]:
    """Create whatever is missing (everything with `force`), then render the allow-lists.

    Existing material is kept, so running it twice changes nothing: a thumbprint that was already on an
    allow-list stays valid. A leaf close to expiry is re-issued. Returns what was created, for the log.
    """
    policy = policy or Policy.load()
    created: list[str] = []
    if force or not layout.ca_cert.exists() or not layout.intermediate_cert.exists():
        # A new CA: nothing of the old one may linger — not its rotation leftovers (they would stay listed),
        # not its revocations (its serials mean nothing to the new intermediate), not its CRL.
        for leftover in (layout.out / "next", layout.out / "previous"):
            shutil.rmtree(leftover, ignore_errors=True)
        layout.revocations.unlink(missing_ok=True)
        layout.crl.unlink(missing_ok=True)
        root = CertificateAuthority.root(key_type=key_type)
        issuing = root.intermediate()
        write_file(layout.ca_key, root.key_pem(), private=True)
        write_file(layout.ca_cert, root.cert_pem())
        write_file(layout.intermediate_key, issuing.key_pem(), private=True)
        write_file(layout.intermediate_cert, issuing.cert_pem())
        created += ["ca", "intermediate"]
        force = True  # identities signed by an old CA would no longer verify
    for name in policy.services + policy.clients:
        if force or _needs_renewal(layout.cert(name)):
            issue_identity(layout, policy, name, client_only=name in policy.clients, key_type=key_type)
            created.append(name)
    if not layout.crl.exists() or _crl_needs_renewal(layout.crl):
        write_crl(layout)  # from the revocation record: a lost crl.pem comes back with every revocation
        created.append("crl")
    render_allow_lists(layout, policy)
    return created


# ── revocation ─────────────────────────────────────────────────────────────────────────────────────────


def load_crl(path: Path) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(path.read_bytes())
    except FileNotFoundError:
        raise PKIError(f"{path}: no such CRL — run `make pki` to create it") from None
    except ValueError as e:
        raise PKIError(f"{path}: not a PEM CRL ({e})") from None


def _crl_needs_renewal(path: Path) -> bool:
    next_update = load_crl(path).next_update_utc
    return next_update is None or next_update - RENEW_BEFORE < _now()


def _read_record(layout: Layout) -> dict[str, Any]:
    """The revocation record: {"crl_number", "last_update", "revoked": [{"serial", "date", "reason", "name"}]}.

    A PKI made before the record existed gets one seeded from its crl.pem.
    """
    if layout.revocations.exists():
        try:
            return json.loads(layout.revocations.read_text())
        except (OSError, ValueError) as e:
            raise PKIError(
                f"{layout.revocations}: unreadable revocation record ({e}); restore it from backup"
            ) from None
    record: dict[str, Any] = {"crl_number": 0, "last_update": None, "revoked": []}
    if layout.crl.exists():
        crl = load_crl(layout.crl)
        record["crl_number"] = _crl_number(crl)
        record["last_update"] = crl.last_update_utc.isoformat()
        for entry in crl:
            try:
                reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
            except x509.ExtensionNotFound:
                reason = x509.ReasonFlags.unspecified
            name = next((k for k, v in REVOCATION_REASONS.items() if v == reason), "unspecified")
            record["revoked"].append(
                {"serial": f"{entry.serial_number:x}", "date": entry.revocation_date_utc.isoformat(), "reason": name}
            )
    return record


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def write_crl(layout: Layout) -> x509.CertificateRevocationList:
    """Sign a new CRL with the intermediate from the revocation record: the next number, valid for CRL_VALIDITY.

    The CRL lists serial numbers, not names: it revokes one certificate, and a re-issued certificate for
    the same name (a new serial) is unaffected. Numbers and dates only go up, even if crl.pem was lost:
    a running service refuses a CRL older than the one it has (shared.tls), and rightly so.
    """
    issuing = layout.load_issuer()
    record = _read_record(layout)
    now = _now()
    number, last_update = record["crl_number"] + 1, now - CLOCK_SKEW
    previous_updates = [dt.datetime.fromisoformat(record["last_update"])] if record["last_update"] else []
    if layout.crl.exists():
        previous = load_crl(layout.crl)
        number = max(number, _crl_number(previous) + 1)
        previous_updates.append(previous.last_update_utc)
    if previous_updates:
        # OpenSSL keeps every CRL a running service has loaded and checks against the one with the latest
        # lastUpdate — keeping the *first* on a tie. So each CRL must be strictly newer than the one before,
        # even when two revocations come within the same second.
        last_update = min(max(last_update, max(previous_updates) + dt.timedelta(seconds=1)), now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuing.cert.subject)
        .last_update(last_update)
        .next_update(now + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuing.key.public_key()), critical=False)
    )
    for entry in record["revoked"]:
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(entry["serial"], 16))
            .revocation_date(dt.datetime.fromisoformat(entry["date"]))
            .add_extension(x509.CRLReason(REVOCATION_REASONS[entry["reason"]]), critical=False)
            .build()
        )
        builder = builder.add_revoked_certificate(revoked)
    crl = builder.sign(issuing.key, hashes.SHA256())
    record |= {"crl_number": number, "last_update": last_update.isoformat()}
    _write_record(layout, record)
    write_file(layout.crl, crl.public_bytes(serialization.Encoding.PEM))
    return crl


def _write_record(layout: Layout, record: dict[str, Any]) -> None:
    write_file(layout.revocations, (json.dumps(record, indent=2) + "\n").encode())


def revoke(layout: Layout, name: str, reason: str = "unspecified", cert_path: Path | None = None) -> int:
    """Put `name`'s current certificate on the CRL; return its serial. Revoking twice changes nothing.

    The revocation goes into the record first, then into a new CRL: whatever happens to crl.pem later,
    `make pki` renders it again with this revocation in it.
    """
    if reason not in REVOCATION_REASONS:
        raise PKIError(f"unknown reason {reason!r}: choose one of {', '.join(REVOCATION_REASONS)}")
    leaf = load_certificates(cert_path or layout.cert(name))[0]
    record = _read_record(layout)
    serial = f"{leaf.serial_number:x}"
    if any(entry["serial"] == serial for entry in record["revoked"]):
        return leaf.serial_number
    record["revoked"].append({"serial": serial, "date": _now().isoformat(), "reason": reason, "name": name})
    _write_record(layout, record)
    write_crl(layout)
    return leaf.serial_number


# ── rotation ───────────────────────────────────────────────────────────────────────────────────────────
#
# A rotation must not fail a single request. The callees of the rotated identity must accept the new
# certificate *before* it is presented, and keep accepting the old one while connections that use it
# drain. So it has three steps:
#   1. begin:  issue the new certificate into next/, and list both thumbprints on the allow-lists;
#   2. finish: (once every callee has re-read its allow-list) put the new key and certificate in place,
#              keeping the old certificate in previous/ — still listed;
#   3. retire: (later, at leisure) drop the old thumbprint and revoke the old certificate as superseded.


def rotate_begin(layout: Layout, policy: Policy, name: str) -> Identity:
    """Issue a successor with the same SANs and usages as the current certificate; list it alongside."""
    current = load_certificates(layout.cert(name))[0]
    sans = {"dns": [], "ips": [], "uris": []}
    kinds = {x509.DNSName: "dns", x509.IPAddress: "ips", x509.UniformResourceIdentifier: "uris"}
    try:
        for general_name in current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value:
            sans[kinds[type(general_name)]].append(str(general_name.value))
    except x509.ExtensionNotFound:
        pass
    try:
        ekus = current.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        usages: list[Usage] = [u for u, oid in _EKU.items() if oid in ekus]
    except x509.ExtensionNotFound:
        usages = []
    key_type: KeyType = "rsa" if isinstance(current.public_key(), rsa.RSAPublicKey) else "ecdsa"
    successor = layout.load_issuer().issue(name, **sans, usages=usages, key_type=key_type)
    successor.write(layout.out / "next", name)
    render_allow_lists(layout, policy)
    return successor


def rotate_finish(layout: Layout, policy: Policy, name: str) -> Identity:
    """Present the successor: old certificate to previous/ (still listed), new key and certificate in place."""
    if not layout.next_cert(name).exists():
        raise PKIError(f"no rotation of {name} is under way: run `python -m pki rotate {name}`")
    successor = Identity.load(layout.next_cert(name), layout.next_key(name))
    write_file(layout.previous_cert(name), layout.cert(name).read_bytes())
    # Key first, then certificate: a service reloading in between sees a mismatch, refuses it, and
    # simply picks up the complete pair on its next look.
    write_file(layout.key(name), successor.key_pem(), private=True)
    write_file(layout.cert(name), successor.cert_pem())
    layout.next_cert(name).unlink()
    layout.next_key(name).unlink()
    render_allow_lists(layout, policy)
    return successor


def retire(layout: Layout, policy: Policy, name: str) -> int | None:
    """End the overlap: drop the old thumbprint from the allow-lists and revoke the old certificate."""
    previous = layout.previous_cert(name)
    if not previous.exists():
        return None
    serial = revoke(layout, name, "superseded", cert_path=previous)
    previous.unlink()
    render_allow_lists(layout, policy)
    return serial


# An identity's name becomes its DNS SAN and the last segment of its SPIFFE ID: one lowercase DNS label, so
# that no two names can match each other (DNS matching ignores case) and no name can smuggle in a path.
IDENTITY_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def issue_identity(
    layout: Layout,
    policy: Policy,
    name: str,
    *,
    extra_sans: Sequence[str] = (),
    client_only: bool = False,
    key_type: KeyType | None = None,
) -> Identity:
    """Issue `name` from our intermediate and write it into the layout. It is on no allow-list by itself.

    Extra SANs may add addresses, never another identity: callers check a callee by its name, so a
    certificate for `billing` that also said `DNS:service-b` would pass as service-b. The SPIFFE ID always
    comes from `name`.
    """
    if name in RESERVED_NAMES or not IDENTITY_NAME.fullmatch(name):
        raise PKIError(
            f"{name!r} cannot be an identity name: use lowercase letters, digits and '-' (a DNS label), "
            f"such as 'billing', and none of {', '.join(sorted(RESERVED_NAMES))}"
        )
    sans: dict[str, list[str]] = {"dns": [], "ips": [], "uris": [policy.spiffe_id(name)]}
    if not client_only:
        for kind, values in service_sans(name).items():
            sans[kind] += values
    others = (set(policy.services) | set(policy.clients)) - {name}
    for san in extra_sans:
        kind, value = parse_san(san)
        if kind == "dns" and (value.lower().rstrip(".") in others or "*" in value):
            raise PKIError(
                f"--san {san}: a certificate for {name} may not carry {value!r}, the name of another identity "
                "(or a wildcard): it would pass as that identity wherever callers check names"
            )
        if kind == "uris" and value.lower().startswith("spiffe:"):
            raise PKIError(f"--san {san}: the SPIFFE ID comes from the name ({policy.spiffe_id(name)}), never by hand")
        sans[kind].append(value)
    identity = layout.load_issuer().issue(
        name,
        **sans,
        usages=("client",) if client_only else ("server", "client"),
        key_type=key_type,
    )
    identity.write(layout.out, name)
    return identity


def deploy(layout: Layout, policy: Policy, name: str, dest: Path, owner: tuple[int, int]) -> list[str]:
    """Copy into `dest` what identity `name` needs and nothing else, owned by the user it runs as.

    Its own key and certificate, the trust anchor, the CRL, and — for a service — its allow-list and the
    metrics allow-list. No other identity's key: a compromised container must yield only its own. Anything
    else found in `dest` is removed. Keys stay 0600, which is why they must belong to `owner`. Returns the
    files copied, relative to `dest`.

        deploy(Layout(), Policy.load(), "service-b", Path("/deploy/service-b"), (10002, 10002))
    """
    if name not in policy.services and name not in policy.clients:
        raise PKIError(f"{name!r} is not in the policy: deploy one of {', '.join(policy.services + policy.clients)}")
    wanted = [layout.ca_cert, layout.crl, layout.cert(name), layout.key(name)]
    if name in policy.services:
        wanted += [layout.allow_list(name), layout.metrics_allow_list]
    relative = {source.relative_to(layout.out): source for source in wanted}
    for existing in list(dest.rglob("*")):
        if not existing.is_dir() and existing.relative_to(dest) not in relative:
            existing.unlink()  # left by an older deploy: no file stays that this identity does not need
    os.chown(dest, *owner)
    for target, source in relative.items():
        if not source.exists():
            raise PKIError(f"{source}: missing — run `make pki` first")
        if target.parent != Path("."):
            (dest / target.parent).mkdir(exist_ok=True)
            os.chown(dest / target.parent, *owner)
        write_file(dest / target, source.read_bytes(), private=source.suffix == ".key", owner=owner)
    return sorted(map(str, relative))


def parse_san(text: str) -> tuple[str, str]:
    """`DNS:name`, `IP:addr`, `URI:scheme://…`, or a bare value whose kind is guessed."""
    prefix, sep, value = text.partition(":")
    kinds = {"dns": "dns", "ip": "ips", "uri": "uris"}
    if sep and prefix.lower() in kinds and not value.startswith("//"):
        kind, text = kinds[prefix.lower()], value
        if kind == "ips":
            ipaddress.ip_address(text)
        return kind, text
    if "://" in text:
        return "uris", text
    try:
        ipaddress.ip_address(text)
        return "ips", text
    except ValueError:
        return "dns", text


def render_allow_lists(layout: Layout, policy: Policy) -> None:
    """Turn the policy's names into thumbprints: one file per service, one caller per line."""
    for callee in policy.services:
        header = f"Allow-list of {callee}: the callers whose certificate may call it."
        _render(layout, policy, layout.allow_list(callee), header, policy.allow.get(callee, ()))
    header = "Who may read GET /metrics on every service."
    _render(layout, policy, layout.metrics_allow_list, header, policy.metrics)


def _render(layout: Layout, policy: Policy, path: Path, header: str, callers: Iterable[str]) -> None:
    lines = [
        f"# {header}",
        "# Rendered from pki/policy.toml by `python -m pki`; edit the policy, then run `make pki`.",
        "# Format: one SHA-256 certificate thumbprint per line (64 hex digits, colons allowed);",
        "# '#' starts a comment. An empty list admits nobody.",
    ]
    for caller in callers:
        for cert, note in [
            (layout.cert(caller), ""),
            (layout.next_cert(caller), " (next: rotation under way)"),
            (layout.previous_cert(caller), " (previous: until `pki retire`)"),
        ]:
            if cert.exists():
                leaf = load_certificates(cert)[0]
                lines.append(f"{thumbprint(leaf)}  # {caller} {policy.spiffe_id(caller)}{note}")
    write_file(path, ("\n".join(lines) + "\n").encode())
