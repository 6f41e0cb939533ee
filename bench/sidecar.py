"""The chain users would build instead: the same plaintext service code, with nginx sidecars doing mTLS.

Per service, an inbound sidecar terminates mTLS (`ssl_verify_client on`, our CA, the service's own
certificate) and passes the request to the plaintext app; per caller, an outbound sidecar takes the app's
plaintext call and originates mTLS to the next hop's inbound sidecar (`proxy_ssl_certificate`, `proxy_ssl_verify
on`, `proxy_ssl_name` = the callee). Same certificates, same TLS versions and TLS 1.2 suites, keep-alive on
every leg. One nginx process (one worker) serves every sidecar of the chain: on 2 cores it competes for CPU
with the three apps, as sidecars in one pod would.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shared.layout import Layout
from shared.tls import TLS12_CIPHERS


@dataclass(frozen=True)
class SidecarPorts:
    inbound: Sequence[int]  # per service: where callers connect, mTLS
    outbound: Sequence[int]  # per caller service (all but the last): where its app sends plaintext
    apps: Sequence[int]  # per service: the plaintext app


def config(layout: Layout, names: Sequence[str], ports: SidecarPorts, run: Path) -> str:
    pki = layout.out.resolve()
    blocks = []
    for i, name in enumerate(names):
        blocks.append(f"""
    upstream app_{i} {{ server 127.0.0.1:{ports.apps[i]}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{ports.inbound[i]} ssl;
        ssl_certificate {pki}/{name}.crt;
        ssl_certificate_key {pki}/{name}.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {TLS12_CIPHERS};
        ssl_verify_client on;
        ssl_client_certificate {pki}/ca.crt;
        ssl_verify_depth 2;
        location / {{
            proxy_pass http://app_{i};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Client-Cert $ssl_client_escaped_cert;
        }}
    }}""")
        if i + 1 < len(names):
            callee = names[i + 1]
            blocks.append(f"""
    upstream next_{i} {{ server 127.0.0.1:{ports.inbound[i + 1]}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{ports.outbound[i]};
        location / {{
            proxy_pass https://next_{i};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_certificate {pki}/{name}.crt;
            proxy_ssl_certificate_key {pki}/{name}.key;
            proxy_ssl_trusted_certificate {pki}/ca.crt;
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_name {callee};
            proxy_ssl_server_name on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_session_reuse on;
        }}
    }}""")
    return f"""daemon off;
master_process off;
error_log {run}/error.log warn;
pid {run}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    keepalive_requests 100000;
{"".join(blocks)}
}}
"""


@contextmanager
def running_sidecars(layout: Layout, names: Sequence[str], ports: SidecarPorts) -> Iterator[int]:
    """nginx serving every sidecar of the chain, until the block ends; yields its process id."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise SystemExit("bench: the sidecar chain needs nginx (Debian: apt-get install nginx-light)")
    with tempfile.TemporaryDirectory(prefix="mesh-sidecar-") as scratch:
        run = Path(scratch)
        (run / "nginx.conf").write_text(config(layout, names, ports, run))
        process = subprocess.Popen([nginx, "-p", str(run), "-c", str(run / "nginx.conf")])
        try:
            deadline = time.monotonic() + 20
            for port in [*ports.inbound, *ports.outbound]:
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                        break
                    except OSError:
                        if process.poll() is not None or time.monotonic() > deadline:
                            raise SystemExit(f"bench: nginx did not start: {(run / 'error.log').read_text()}") from None
                        time.sleep(0.05)
            yield process.pid
        finally:
            process.terminate()
            process.wait(timeout=10)
