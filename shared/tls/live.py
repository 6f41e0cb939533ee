"""TLS while a service runs: contexts rebuilt when files change, every peer checked against the trust in force."""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from shared.packed import Serials
from shared.tls.contexts import TLSProfile, client_context, server_context
from shared.tls.material import TLSMaterial
from shared.tls.peer import connection_peer, verified_chain
from shared.tls.reading import Read, Revocations, read, verify_later
from shared.x509.certs import parse_certificates
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
    revoked: Mapping[str, Serials]  # issuer key id → the serials its CRL revokes
    # Per issuer key: when its CRL in force was issued and when it expires (lastUpdate, nextUpdate). Outside
    # that window OpenSSL would refuse every peer of that CA, and so do we.
    windows: Mapping[str, tuple[dt.datetime, dt.datetime | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    """Everything one reload swaps in (LiveTLS.prepare builds it, LiveTLS.install swaps it in)."""

    server: ssl.SSLContext
    client: ssl.SSLContext | None
    built_from: bytes  # SHA-256 of the files the contexts were built from (ca, cert, key): no copy of the key
    revocations: dict[str, Revocations]  # by issuer key
    trust: Trust
    anchors: list[str]
    certificate: x509.Certificate | None


class LiveTLS:
    """A running service's TLS contexts, rebuilt from its files whenever they change and swapped in whole.

    We run the handshake ourselves (shared.inbound.handshake), and it asks for `server` on every new connection; the
    pool towards the next hop is renewed with `client`. So a rebuilt pair takes effect from the next
    connection on: a renewed certificate, a CA added to ca.crt — or taken out of it, which loading into a live
    OpenSSL context could never do. A CRL is not in the contexts (below): when it alone changes they stay, and
    the new trust applies at once. A broken file raises and changes nothing.
    Each file is read once, checked, and written to a private temporary directory only for OpenSSL to load
    (it reads from paths only), then deleted: no copy of the key outlives it.

    A handshake verifies the peer with the context it began with, and it may end after a reload: so every
    handshake, on either side, is checked again against `trust` as it is when it completes (`recheck`), every
    open connection when it changes or the clock passes a certificate's or a CRL's end (`refusal`,
    services.reloader), and every request (shared.authz.authorize_trusted_now). One rule for all of them.

    That check is also where revocation happens: the contexts carry no CRL (OpenSSL would verify the CRL's
    signature again on every handshake, hashing all of it), and `recheck` looks the peer's serial up in the set
    of its issuer's key, built once per reload (shared.tls.reading) — the same cost at 10 entries or 100,000.
    Each CRL's signature is verified once: at reload when its CA's certificate is at hand (ca.crt, our own
    chain), or else — another intermediate of ours, during a CA rollover — on the first handshake whose peer's
    chain, verified by OpenSSL up to ca.crt, brings that CA's certificate. Until then no peer of that CA gets in.

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
        self.crls: list[Revocations] = []  # in crl.pem's order, one per CA
        self._unverified: dict[str, Revocations] = {}  # by issuer key: signature not checked yet
        self._built_from = b""  # Prepared.built_from of the contexts in force
        self.generation = 0
        self.reload()

    def reload(self) -> None:
        """Build new contexts from the files as they are now and swap them in, or raise and change nothing."""
        self.install(self.prepare(read(self.material, self.crls)))

    def prepare(self, files: Read) -> Prepared:
        """Everything a reload swaps in, from the files as `shared.tls.reading.read` found them — changing nothing.
        The slow part, reading and checking (a CRL of 100,000 entries takes hundreds of milliseconds), is done by
        then, off the event loop (services.reloader); what is left is building the contexts, a few milliseconds,
        when the CA, the certificate or the key changed. Raises MaterialError naming the file, as `reload` does."""
        if files.checked_against != self.crls:  # another reload came first: equal in content, serials and all
            raise MaterialError(f"{self.material.crl}: reloaded by someone else meanwhile — reload again")
        built_from = _fingerprint(files.files)
        if built_from == self._built_from:
            # A CRL alone changed (a revocation, a CRL re-signed): the contexts carry no CRL, and the same files
            # build the same contexts, so they stay. Building them is most of a reload's pause of the event loop,
            # and new ones would make every pool to a callee start over with new handshakes.
            server, client = self.server, self.client
        else:
            with _scratch() as directory:
                # Checked by `read`, CRLs included; OpenSSL gets no CRL (see the class): the copy it loads has none.
                written = self.material.written_to(directory, files.files)
                server = server_context(
                    written, require_client_cert=self.require_client_cert, profile=self.profile, openssl_crl=False
                )
                client = client_context(written, profile=self.profile, openssl_crl=False) if self.outgoing else None
        revocations = files.revocations
        trust = Trust(
            anchors=frozenset(files.anchors),
            issuers=frozenset(revocations) if self.material.crl is not None else None,
            revoked={key: crl.serials for key, crl in revocations.items()},
            windows={key: (crl.last_update, crl.next_update) for key, crl in revocations.items()},
        )
        own = files.files.get("cert")
        certificate = parse_certificates(own, self.material.cert, "certificate")[0] if own else None  # type: ignore[arg-type]
        return Prepared(server, client, built_from, revocations, trust, files.anchors, certificate)

    def install(self, new: Prepared) -> None:
        """Swap in what `prepare` built, all of it at once (on the event loop: between two handshakes)."""
        self.server, self.client, self.trust = new.server, new.client, new.trust
        self._built_from = new.built_from
        self.crls = list(new.revocations.values())
        self._unverified = {key: crl for key, crl in new.revocations.items() if crl.der is not None}
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
        if not verify_later(crl, x509.load_der_x509_certificate(chain[1])):
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
        if peer.serial in trust.revoked.get(peer.issuer_key_id, ()):
            return "certificate revoked"  # OpenSSL's words: what callers and the logs said before
        if (window := trust.windows.get(peer.issuer_key_id)) is not None:
            issued, expires = window
            if now < issued:
                return "CRL is not yet valid"
            if expires is not None and now > expires:
                return "CRL has expired"
        return None


def _fingerprint(files: Mapping[str, bytes]) -> bytes:
    """One SHA-256 for the files contexts are built from, each by name: equal exactly when every file is."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.digest()


@contextmanager
def _scratch() -> Iterator[Path]:
    """A directory only we can enter (0700), removed with everything in it as soon as OpenSSL has read it."""
    with tempfile.TemporaryDirectory(prefix="mesh-tls-") as directory:
        yield Path(directory)
