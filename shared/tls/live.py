"""TLS while a service runs: contexts rebuilt when files change, every peer checked against the trust in force."""

from __future__ import annotations

import datetime as dt
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from shared.tls.contexts import TLSProfile, client_context, server_context
from shared.tls.material import TLSMaterial
from shared.tls.peer import connection_peer, verified_chain
from shared.x509.certs import authority_key_id, crl_number, key_id, parse_certificates, thumbprint
from shared.x509.files import MaterialError
from shared.x509.identity import PeerIdentity

# LiveTLS.recheck: why the trust in force now refuses the peer of a just-completed handshake, or None.
Recheck = Callable[[ssl.SSLObject], str | None]


@dataclass(frozen=True)
class Trust:
    """What a peer certificate is checked against while we run, computed once per reload: set lookups only.

    CAs are named by key, never by name: `pki init --force` makes a new CA with the old one's names.
    """

    anchors: frozenset[str]  # SHA-256 of every CA certificate in ca.crt
    issuers: frozenset[str] | None  # key ids (hex) of the CAs whose leaves count: one CRL each; None: no CRL
    revoked: frozenset[tuple[str, int]]  # (issuer key id, serial) of every certificate the CRLs revoke
    # Per issuer key: when its CRL in force was issued and when it expires (lastUpdate, nextUpdate). Outside
    # that window OpenSSL would refuse every peer of that CA, and so do we.
    windows: Mapping[str, tuple[dt.datetime, dt.datetime | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    """Everything one reload swaps in (LiveTLS.prepare builds it, LiveTLS.install swaps it in)."""

    server: ssl.SSLContext
    client: ssl.SSLContext | None
    crls: list[x509.CertificateRevocationList]
    keyed: dict[str, x509.CertificateRevocationList]
    trust: Trust
    unverified: dict[str, x509.CertificateRevocationList]
    anchors: list[str]
    certificate: x509.Certificate | None
    replaces: dict[str, x509.CertificateRevocationList]  # the CRLs in force it was checked against


class LiveTLS:
    """A running service's TLS contexts, rebuilt from its files whenever they change and swapped in whole.

    We run the handshake ourselves (shared.handshake), and it asks for `server` on every new connection; the
    pool towards the next hop is renewed with `client`. So a rebuilt pair takes effect from the next
    connection on, whatever changed: a renewed certificate, a revocation, a CA added to ca.crt — or taken out
    of it, which loading into a live OpenSSL context could never do. A broken file raises and changes nothing.
    Each file is read once, checked, and written to a private temporary directory only for OpenSSL to load
    (it reads from paths only), then deleted: no copy of the key outlives it.

    A handshake verifies the peer with the context it began with, and it may end after a reload: so every
    handshake, on either side, is checked again against `trust` as it is when it completes (`recheck`), and
    every open connection when it changes (`refusal`, services.reloader). One rule for the three.

    That check is also where revocation happens: the contexts carry no CRL (OpenSSL would verify the CRL's
    signature again on every handshake, hashing all of it), and `recheck` looks the peer's (issuer key, serial)
    up in a set built once per reload — the same cost at 10 entries or 100,000. Each CRL's signature is verified
    once: at reload when its CA's certificate is at hand (ca.crt, our own chain), or else — another intermediate
    of ours, during a CA rollover — on the first handshake whose peer's chain, verified by OpenSSL up to ca.crt,
    brings that CA's certificate. Until then no peer of that CA gets in.

    Revocations only grow: a CRL older than the one in force for its issuer, or one that drops a revoked
    certificate, is refused — a lost crl.pem must never quietly un-revoke anyone. "Its issuer" is a key: a
    new CA (`pki init --force`: new keys, the same names) is a new issuer, and its CRL is taken whole, the old
    CA's with it gone. Then the old CA's leaves have no CRL in force and its certificate may have left
    ca.crt: new handshakes refuse them, and the reloader closes their open connections. Refusing the new CA
    instead would leave a service trusting a CA that the PKI, and every service restarted since, no longer
    knows — a mesh split in two. Either way, never half: no old-CA connection outlives the reload.
    """

    def __init__(
        self,
        material: TLSMaterial,
        *,
        require_client_cert: bool = True,
        outgoing: bool = True,
        profile: TLSProfile = "intermediate",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.material = material
        self.clock = clock  # seconds since the epoch: what `refusal` judges a peer's expiry by
        self.require_client_cert = require_client_cert
        self.outgoing = outgoing
        self.profile = profile
        self.crls: list[x509.CertificateRevocationList] = []
        self._crls_by_key: dict[str, x509.CertificateRevocationList] = {}
        self._unverified: dict[str, x509.CertificateRevocationList] = {}  # by issuer key: signature not checked yet
        self.generation = 0
        self.reload()

    def reload(self) -> None:
        """Build new contexts from the files as they are now and swap them in, or raise and change nothing."""
        self.install(self.prepare())

    def prepare(self) -> Prepared:
        """Read, check and build everything a reload swaps in — the slow part (a CRL of 100,000 entries takes
        hundreds of milliseconds) — changing nothing, so that it can run on a worker thread while the event loop
        serves requests (services.reloader). Raises MaterialError naming the file, as `reload` does."""
        data = self.material.read()
        crls = self.material.verify(data)
        anchors = parse_certificates(data["ca"], self.material.ca, "CA file")
        chain = parse_certificates(data["cert"], self.material.cert, "certificate") if "cert" in data else []  # type: ignore[arg-type]
        if len(chain) > 1 and self.material.crl is not None:
            _require_crl_of(chain[1], crls, self.material.crl, self.material.cert)  # type: ignore[arg-type]
        keyed = _one_per_key(crls, [*anchors, *chain[1:]], self.material.crl)  # type: ignore[arg-type]
        in_force = self._crls_by_key
        for key, crl in keyed.items():
            if key in in_force:
                _check_successor(in_force[key], crl, self.material.crl)  # type: ignore[arg-type]
        unverified = _verify_signatures(keyed, anchors, chain[1:], self.material.crl)  # type: ignore[arg-type]
        with _scratch() as directory:
            # Checked above, CRLs included; OpenSSL gets no CRL (see the class), so the copy it loads has none.
            files = self.material.written_to(directory, {k: v for k, v in data.items() if k != "crl"})
            server = server_context(
                files, require_client_cert=self.require_client_cert, profile=self.profile, openssl_crl=False
            )
            client = client_context(files, profile=self.profile, openssl_crl=False) if self.outgoing else None
        trust = Trust(
            anchors=frozenset(thumbprint(anchor) for anchor in anchors),
            issuers=frozenset(keyed) if self.material.crl is not None else None,
            revoked=frozenset((key, entry.serial_number) for key, crl in keyed.items() for entry in crl),
            windows={key: (crl.last_update_utc, crl.next_update_utc) for key, crl in keyed.items()},
        )
        anchor_list = [thumbprint(anchor) for anchor in anchors]
        certificate = chain[0] if chain else None
        return Prepared(server, client, crls, keyed, trust, unverified, anchor_list, certificate, in_force)

    def install(self, new: Prepared) -> None:
        """Swap in what `prepare` built, all of it at once (on the event loop: between two handshakes)."""
        if new.replaces is not self._crls_by_key:  # another reload came first: its CRLs were not checked against
            raise MaterialError(f"{self.material.crl}: reloaded by someone else meanwhile — reload again")
        self.server, self.client, self.crls, self._crls_by_key = new.server, new.client, new.crls, new.keyed
        self.trust, self._unverified = new.trust, dict(new.unverified)
        self.anchors = new.anchors  # what we trust, in ca.crt's order, for /healthz and the gates
        self.certificate = new.certificate
        self.generation += 1

    def recheck(self, ssl_object: ssl.SSLObject) -> str | None:
        """Why the trust in force now refuses the peer of this just-completed handshake, or None.

        The handshake verified the chain with the context it began with, which a reload may have replaced
        since: a revocation, a CA retired or replaced. A resumed session carries no chain to name its CA: it
        passes only on the context in force, under which the full handshake it resumes was made.
        """
        peer = connection_peer(ssl_object)
        if peer is None:
            return None  # no certificate: CERT_REQUIRED refused it already, CERT_OPTIONAL leaves it to the app
        if peer.anchor is None and ssl_object.context not in (self.server, self.client):
            return "resumed a session made under trust that has changed since (a full handshake is needed)"
        return self.refusal(peer) or self._crl_signature(peer.issuer_key_id, ssl_object)

    def _crl_signature(self, issuer_key: str, ssl_object: ssl.SSLObject) -> str | None:
        """Verify, once, the CRL of a CA whose certificate reload did not have, with the one in the peer's chain."""
        crl = self._unverified.get(issuer_key)
        if crl is None:
            return None
        chain = verified_chain(ssl_object)
        if len(chain) < 2:  # a resumed session shows no chain; the full handshake it resumes verified the CRL
            return "the CRL of its issuing CA is not verified yet: a full handshake is needed"
        issuer = x509.load_der_x509_certificate(chain[1])
        if crl.issuer != issuer.subject or not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
            return "CRL signature failure"
        self._unverified.pop(issuer_key, None)
        return None

    def refusal(self, peer: PeerIdentity) -> str | None:
        """Why a peer verified earlier would be refused now, or None. Set lookups only: it runs on every handshake."""
        trust, now = self.trust, dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        if peer.not_after is not None and now > peer.not_after:
            return "certificate has expired"
        if peer.anchor is not None and peer.anchor not in trust.anchors:
            return f"its root CA (SHA-256 {peer.anchor[:16]}…) is no longer trusted: it is not in ca.crt"
        if trust.issuers is not None and peer.issuer_key_id not in trust.issuers:
            issuer = peer.issuer_key_id[:16] or "none"
            return f"its issuing CA (key id {issuer}…) is no longer trusted: no CRL of it is in force"
        if (peer.issuer_key_id, peer.serial) in trust.revoked:
            return "certificate revoked"  # OpenSSL's words: what callers and the logs said before
        if (window := trust.windows.get(peer.issuer_key_id)) is not None:
            issued, expires = window
            if now < issued:
                return "CRL is not yet valid"
            if expires is not None and now > expires:
                return "CRL has expired"
        return None


@contextmanager
def _scratch() -> Iterator[Path]:
    """A directory only we can enter (0700), removed with everything in it as soon as OpenSSL has read it."""
    with tempfile.TemporaryDirectory(prefix="mesh-tls-") as directory:
        yield Path(directory)


def _one_per_key(
    crls: list[x509.CertificateRevocationList], cas: list[x509.Certificate], path: Path
) -> dict[str, x509.CertificateRevocationList]:
    """Each CRL by the key of the CA that signed it — one per key. Two of one CA would leave the choice to the
    order of the file, and an older one placed last (genuine, signed, unexpired) would un-revoke certificates."""
    keyed: dict[str, x509.CertificateRevocationList] = {}
    for crl in crls:
        key = _crl_key(crl, cas, path)
        if key in keyed:
            raise MaterialError(
                f"{path}: two CRLs of {crl.issuer.rfc4514_string()} (numbers {crl_number(keyed[key])} and "
                f"{crl_number(crl)}), so the whole file is refused and the revocations in force stay as they were — "
                "one CRL per CA: run `make pki` to re-sign it"
            )
        keyed[key] = crl
    return keyed


def _crl_key(crl: x509.CertificateRevocationList, cas: list[x509.Certificate], path: Path) -> str:
    """The key id (hex) of the CA that signed `crl`: its AKI, or for a CRL that omits it (RFC 5280 says it
    must not), the key of the CA certificate of ours that bears its issuer's name."""
    if (signer := authority_key_id(crl)) is not None:
        return signer.hex()
    for ca in cas:
        if ca.subject == crl.issuer and (key := key_id(ca)) is not None:
            return key.hex()
    raise MaterialError(
        f"{path}: a CRL of {crl.issuer.rfc4514_string()} names no issuer key (AuthorityKeyIdentifier) and no CA "
        "certificate of ours bears that name — regenerate it with `make pki`"
    )


def _verify_signatures(
    keyed: dict[str, x509.CertificateRevocationList],
    anchors: list[x509.Certificate],
    intermediates: list[x509.Certificate],
    path: Path,
) -> dict[str, x509.CertificateRevocationList]:
    """Verify each CRL whose CA certificate we hold (TLSMaterial.verify did those of our own intermediates that
    name it); return the others, by issuer key, for `LiveTLS.recheck` to verify with a peer's verified chain."""
    ours = {key.hex(): ca for ca in [*anchors, *intermediates] if (key := key_id(ca)) is not None}
    checked = {key.hex() for ca in intermediates if (key := key_id(ca)) is not None}
    unverified = {}
    for key, crl in keyed.items():
        ca = ours.get(key)
        if ca is None:
            unverified[key] = crl
        elif not (key in checked and authority_key_id(crl) is not None) and (
            crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
        ):
            raise MaterialError(f"{path}: CRL signature does not verify with {ca.subject.rfc4514_string()}")
    return unverified


def _check_successor(current: x509.CertificateRevocationList, new: x509.CertificateRevocationList, path: Path) -> None:
    """Refuse a CRL from the same issuer key that is older than the one in force, or that forgets a revocation."""
    dropped = {entry.serial_number for entry in current} - {entry.serial_number for entry in new}
    if crl_number(new) < crl_number(current) or dropped:
        what = f"number {crl_number(new)} with {len(list(new))} entries; in force: number {crl_number(current)}"
        if dropped:
            what += f", and it drops the revoked serial(s) {', '.join(f'{s:x}' for s in sorted(dropped))}"
        raise MaterialError(
            f"{path}: refusing a CRL of {new.issuer.rfc4514_string()} (the same key as the one in force) that would "
            f"un-revoke certificates ({what}) — the CA's revocation record (pki/out/revocations.json) re-creates "
            "the full list: run `make pki`"
        )


def _require_crl_of(
    issuer: x509.Certificate, crls: list[x509.CertificateRevocationList], path: Path, cert: Path
) -> None:
    """Refuse a crl.pem without a CRL that the CA which signed a service's own certificate signed with its key.

    Its peers are the service's: without its CRL OpenSSL refuses every one of them, and the revocations in force
    for it would be forgotten (a CRL signed by a stray key — a CA key restored from the wrong backup — once took its
    place: the mesh went down, and an older crl.pem put back after it un-revoked a stolen key).
    """
    ours = key_id(issuer)

    def signed_by_it(crl: x509.CertificateRevocationList) -> bool:  # a matching AKI was verified in _usable_crl
        signer = authority_key_id(crl)
        return signer == ours if signer is not None else crl.is_signature_valid(issuer.public_key())

    if not any(crl.issuer == issuer.subject and signed_by_it(crl) for crl in crls):
        raise MaterialError(
            f"{path}: no CRL signed by {issuer.subject.rfc4514_string()}, the CA that signed {cert}, so the whole file "
            "is refused and the revocations in force stay as they were — run `make pki` to re-sign it (it stops, "
            "naming the files, if the CA's key does not belong to its certificate)"
        )
