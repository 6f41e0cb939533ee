"""A service's configuration: all that makes service-a differ from service-c is in here, as data.

Every field comes from an environment variable with the prefix `MESH_` (`MESH_NAME`, `MESH_PORT`, …), so
the same code runs locally, under `make run`, and in a container. Paths default to the PKI layout
(`pki/out/<name>.crt`, …) below `MESH_PKI_DIR`.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.inbound import ConnectionLimits
from shared.layout import DEFAULT_OUT, Layout
from shared.tls import TLSMaterial
from shared.tokens import TOKEN_SERVICE


def _fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ServiceConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_", frozen=True)

    name: str  # the service's identity: its certificate, its allow-list, its name in logs
    host: str = "127.0.0.1"
    port: int = 8443
    pki_dir: Path = DEFAULT_OUT
    ca: Path | None = None  # default: <pki_dir>/ca.crt
    cert: Path | None = None  # default: <pki_dir>/<name>.crt
    key: Path | None = None  # default: <pki_dir>/<name>.key
    allow_list: Path | None = None  # default: <pki_dir>/allow/<name>.txt
    crl: Path | None = None  # default: <pki_dir>/crl.pem; checked for callers and callees alike
    metrics_allow_list: Path | None = None  # default: <pki_dir>/allow/metrics.txt: who may read /metrics
    # How often the service looks for changed certificates, keys, CRL and allow-list (SIGHUP: at once).
    # This is also the bound on how long a revoked peer keeps an already-open connection.
    reload_interval: float = 1.0
    # `required` refuses callers without a certificate during the handshake (ssl.CERT_REQUIRED);
    # `optional` lets them in and answers 401 (ssl.CERT_OPTIONAL) — for the walkthrough's comparison.
    client_cert: Literal["required", "optional"] = "required"
    # Mozilla's `intermediate` (TLS 1.2 + 1.3, AEAD suites only) or `modern` (TLS 1.3 only); for the
    # server side and for calls to the next hop alike.
    tls_profile: Literal["intermediate", "modern"] = "intermediate"
    downstream_url: str | None = None  # e.g. https://127.0.0.1:8444; none for the last service
    downstream_name: str | None = None  # the identity the callee must prove, e.g. service-b (its DNS SAN)
    # …and its SPIFFE ID, checked after the handshake. Default: spiffe://<our own trust domain>/<downstream_name>.
    downstream_id: str | None = None
    downstream_timeout: float = 5.0  # seconds, for connect, read and write alike
    # Reuse connections to the next hop (one handshake, many requests). `false` makes every call a new
    # connection and a full mutual handshake: only useful to measure what keep-alive saves (make bench).
    downstream_keepalive: bool = True
    # User tokens (walkthrough chapter 7): where the token service is, and the name it must prove. With it, a
    # request that carries a token has it checked and exchanged for the next hop; `require_user_token` refuses
    # every request without one (401), so that a caller's certificate alone no longer suffices.
    token_service_url: str | None = None  # e.g. https://127.0.0.1:8446
    token_service_name: str = TOKEN_SERVICE
    require_user_token: bool = False
    # The token service itself: how often it starts signing with a new key (the old one stays published
    # until the tokens it signed have expired).
    signing_key_lifetime: float = 3600.0
    log_level: str = "info"
    # Requests are small here: anything bigger is refused before it costs memory (413 / 400).
    max_body_bytes: int = 64 * 1024
    max_header_bytes: int = 16 * 1024
    # What one connection may take (why each bound exists: shared/inbound/limits.py). The peer's first byte (its
    # ClientHello) and its whole TLS handshake must arrive, counted from the accept, and a request (from the
    # handshake or its first byte to its last) must arrive within these seconds; idle keep-alive ends after
    # 5 s (uvicorn); a closing connection waits this long for the peer's TLS close_notify.
    first_byte_timeout: float = 3.0
    handshake_timeout: float = 10.0
    request_timeout: float = 10.0
    shutdown_timeout: float = 2.0
    # Established connections, in all and per caller (a SPIFFE ID, else a certificate): past the caller's
    # share its own idle connection is closed, never another caller's. Default: half the process's
    # file-descriptor limit (raised to the hard limit at start), at most 1024, so that calls to the next hop
    # and reloads always find descriptors left.
    max_connections: int = Field(default_factory=lambda: min(1024, _fd_limit() // 2))
    max_connections_per_caller: int = 128
    # Connections whose handshake has not finished: past it, the oldest of them is shed, never a newcomer.
    # Default: a quarter of the file-descriptor limit, at most 1024.
    max_handshakes: int = Field(default_factory=lambda: min(1024, _fd_limit() // 4))
    # Connections the kernel completes and queues before we accept them (capped by net.core.somaxconn): a
    # burst of sockets beyond it makes the kernel drop new SYNs, and a dropped SYN costs a caller a second.
    listen_backlog: int = 4096

    @model_validator(mode="after")
    def _downstream_complete(self) -> ServiceConfig:
        if bool(self.downstream_url) != bool(self.downstream_name):
            raise ValueError(
                "MESH_DOWNSTREAM_URL and MESH_DOWNSTREAM_NAME go together: where to call, and who must answer"
            )
        if self.require_user_token and not self.token_service_url:
            raise ValueError(
                "MESH_REQUIRE_USER_TOKEN=true needs MESH_TOKEN_SERVICE_URL: without the token service's keys "
                "no token can be checked"
            )
        return self

    @property
    def files(self) -> ServiceFiles:
        """Every file the service reads: what is set explicitly, else the PKI layout's place for it."""
        layout = Layout(self.pki_dir)
        return ServiceFiles(
            ca=self.ca or layout.ca_cert,
            cert=self.cert or layout.cert(self.name),
            key=self.key or layout.key(self.name),
            crl=self.crl or layout.crl,
            allow_list=self.allow_list or layout.allow_list(self.name),
            metrics_allow_list=self.metrics_allow_list or layout.metrics_allow_list,
            tokens_policy=layout.tokens_policy,
        )

    @property
    def tls(self) -> TLSMaterial:
        files = self.files
        return TLSMaterial(ca=files.ca, cert=files.cert, key=files.key, crl=files.crl)

    @property
    def limits(self) -> ConnectionLimits:
        return ConnectionLimits(
            first_byte_timeout=self.first_byte_timeout,
            handshake_timeout=self.handshake_timeout,
            request_timeout=self.request_timeout,
            shutdown_timeout=self.shutdown_timeout,
            max_connections=self.max_connections,
            max_connections_per_caller=self.max_connections_per_caller,
            max_handshakes=self.max_handshakes,
            max_header_bytes=self.max_header_bytes,
            max_body_bytes=self.max_body_bytes,
        )


@dataclass(frozen=True)
class ServiceFiles:
    ca: Path
    cert: Path
    key: Path
    crl: Path
    allow_list: Path
    metrics_allow_list: Path
    tokens_policy: Path  # read by the token service only
