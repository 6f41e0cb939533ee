"""A bare ASGI app for the walkthrough's "your own server" chapter: it says what it knows about its caller.

Under plain `uvicorn --ssl-cert-reqs 2 …` it learns nothing (uvicorn passes no client certificate to the
app); behind a proxy that terminates mTLS it learns what the proxy forwards in `X-Client-Cert` — or what
anybody who can reach it directly claims there.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

from cryptography import x509


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    headers = dict(scope["headers"])
    forwarded = headers.get(b"x-client-cert")
    body = {
        "tls extension from the server": (scope.get("extensions") or {}).get("tls"),
        "caller named by X-Client-Cert": _subject(forwarded) if forwarded else None,
    }
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def _subject(header: bytes) -> str:
    """nginx's $ssl_client_escaped_cert: the PEM, URL-encoded."""
    try:
        return x509.load_pem_x509_certificate(unquote(header.decode()).encode()).subject.rfc4514_string()
    except ValueError:
        return "(not a certificate)"
