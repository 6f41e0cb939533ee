"""The page's web server: loopback only, and nothing for a request without the token the printed URL carries.

Loopback means the browser needs no client certificate, but every user of the machine reaches it too, and the
page shows who calls whom. So, like Jupyter, the server makes a random token at start and prints the URL with
it; any request without it (query `?token=`) gets a bare 403. The Host header must name the loopback address
as well, so that a web page whose name an attacker points at 127.0.0.1 (DNS rebinding) is refused too.

The page (view/page.html) is one file with its script and style inline, and asks for nothing else but
/state: the Content-Security-Policy says so, and an air-gapped machine shows it whole.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["ViewServer"]

PAGE = resources.files("view").joinpath("page.html").read_bytes()
SECURITY_HEADERS = {
    # Inline script and style only; fetch to this origin only; no frames, no forms, nothing from elsewhere.
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",  # the token is in the URL
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


class ViewServer:
    """Serves the page and `state()` as JSON at http://127.0.0.1:<port>/?token=<token> (port 0: any free one).

    with ViewServer(watch.state) as server:
        print(server.url)
    """

    def __init__(self, state: Callable[[], dict[str, Any]], port: int = 0) -> None:
        self.token = secrets.token_urlsafe(24)
        self.served = 0
        view = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                given = parse_qs(url.query).get("token", [""])[0]
                host = self.headers.get("Host", "")
                if not secrets.compare_digest(given.encode(), view.token.encode()) or host not in view.hosts:
                    self._send(403, b"forbidden\n", "text/plain")
                elif url.path == "/":
                    self._send(200, PAGE, "text/html; charset=utf-8")
                elif url.path == "/state":
                    view.served += 1
                    self._send(200, json.dumps(state()).encode(), "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in SECURITY_HEADERS.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per poll would bury the URL; refusals are the 403s the browser shows

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.hosts = {f"127.0.0.1:{self.port}", f"localhost:{self.port}"}
        self.url = f"http://127.0.0.1:{self.port}/?token={self.token}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="view-http", daemon=True)

    def __enter__(self) -> ViewServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
