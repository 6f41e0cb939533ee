"""Does TLS 1.3 post-handshake authentication work under asyncio? Run it and see: `python docs/post_handshake_auth.py`.

TLS 1.3 removed renegotiation; asking a connected client for its certificate later is now "post-handshake
authentication" (RFC 8446 §4.6.2). This script tries it the way a Python web server would have to:

1. an asyncio TLS server (the machinery under uvicorn) that does *not* ask for a certificate during the
   handshake (`post_handshake_auth` on a server context), answers a first request, and then calls
   `ssl_object.verify_client_post_handshake()`;
2. a client with a certificate and `post_handshake_auth = True`, which sends a second request on the
   same connection;
3. the server looks for the client's certificate while answering that second request.

It prints what each side saw. Measured here (Python 3.11, OpenSSL 3.0, asyncio and uvloop alike): while
the first request is still being handled, the certificate never arrives — OpenSSL queues the
CertificateRequest, and asyncio's SSL transport only sends it out with the next write, i.e. with the
response. The handler would have to answer before knowing who asked. The certificate shows up on a
*later* request of the same connection: too late to authorize the one that needed it. That delay is
Python's (ssl and asyncio), not TLS 1.3's: the protocol answers in one flight, with no new keys (RFC 8446
§4.6.2). HTTP/2 forbids post-handshake authentication anyway (RFC 9113 §9.2.3). Requiring the certificate
in the handshake has none of these issues.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
import tempfile
import threading
from pathlib import Path

from pki import init
from shared import tls
from shared.layout import Layout


def peer_certificate(ssl_object: ssl.SSLObject) -> dict | None:
    try:
        return ssl_object.getpeercert() or None
    except ValueError:  # "handshake not done yet": OpenSSL is waiting for the client's answer
        return None


async def serve(context: ssl.SSLContext, ready: threading.Event, port_box: list[int], seen: list[str]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        for number in (1, 2):
            await reader.readuntil(b"\r\n\r\n")
            cert = peer_certificate(ssl_object)
            seen.append(f"server, request {number}: client certificate {'received' if cert else 'absent'}")
            if number == 1:
                ssl_object.verify_client_post_handshake()
                seen.append("server: sent CertificateRequest (verify_client_post_handshake), waiting 1 s for it")
                for _ in range(20):  # what a handler would need: the certificate *for this request*
                    await asyncio.sleep(0.05)
                    if peer_certificate(ssl_object):
                        break
                arrived = "arrived" if peer_certificate(ssl_object) else "did not arrive"
                seen.append(f"server, still in request 1: the certificate {arrived}; answering anyway")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    port_box.append(server.sockets[0].getsockname()[1])
    ready.set()
    async with server:
        await asyncio.sleep(5)


LOOP_RUN = asyncio.run


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        layout = Layout(Path(scratch))
        init(layout)
        server_context = tls.server_context(
            tls.TLSMaterial(layout.ca_cert, layout.cert("service-a"), layout.key("service-a")),
            profile="modern",  # post-handshake authentication exists only in TLS 1.3
        )
        server_context.post_handshake_auth = True  # with CERT_REQUIRED: ask later, not during the handshake
        client_context = tls.client_context(
            tls.TLSMaterial(layout.ca_cert, layout.cert("client"), layout.key("client")), profile="modern"
        )
        client_context.post_handshake_auth = True

        ready, port_box, seen = threading.Event(), [], []
        thread = threading.Thread(target=lambda: LOOP_RUN(serve(server_context, ready, port_box, seen)))
        thread.start()
        ready.wait(5)
        with (
            socket.create_connection(("127.0.0.1", port_box[0])) as raw,
            client_context.wrap_socket(raw, server_hostname="service-a") as conn,
        ):
            for number in (1, 2):
                conn.sendall(b"GET / HTTP/1.1\r\nhost: service-a\r\n\r\n")
                status = conn.recv(1024).split(b"\r\n", 1)[0].decode()
                seen.append(f"client, request {number}: {status}")
        thread.join()
    print("\n".join(seen))
    in_time = any("still in request 1: the certificate arrived" in line for line in seen)
    print(
        "verdict: "
        + (
            "the certificate arrived while the request that needed it was still open"
            if in_time
            else "the certificate never arrived for the request that asked for it"
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
