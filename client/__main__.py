"""`python -m client`: call a service of the mesh as the client (or any identity), and explain the answer.

    python -m client                                   # client → service-a → service-b → service-c
    python -m client https://127.0.0.1:8444/chain --server-name service-b    # skip a hop: refused
    python -m client --no-cert                         # no certificate: refused during the handshake
    python -m client --user alice                      # on behalf of alice: a user token, bound to our certificate

Exit status 0 when the call succeeded, 1 when it was refused or failed (the reason is printed), 2 when
our own files or options are wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from client.explain import explain_problem, hop_table, own_revocation, problem_body
from client.load import load
from shared import tls
from shared.authz import authorize_id
from shared.cli import add_version
from shared.layout import DEFAULT_OUT, Layout
from shared.outbound import (
    CalleeCheck,
    callee_check,
    closed_without_answer,
    explain_transport_error,
    refused_at_tls,
    sync_transport,
)
from shared.tokens import TOKEN_SERVICE, USER_GRANT
from shared.x509 import InvalidSpiffeId, MaterialError, SpiffeId, load_certificates, peer_id

# service-a under `make run`; MESH_CLIENT_URL moves it (`make run PORTS=…` puts A elsewhere and prints the line).
DEFAULT_URL = os.environ.get("MESH_CLIENT_URL") or "https://127.0.0.1:8443/chain"
# The token service under `make run`; MESH_TOKEN_URL moves it.
DEFAULT_TOKEN_URL = os.environ.get("MESH_TOKEN_URL") or "https://127.0.0.1:8446"
ENVIRONMENT = """environment:
  MESH_CLIENT_URL   the URL called when none is given (now: {url})
  MESH_TOKEN_URL    the token service, for --user (now: {token_url})
  MESH_CLIENT_USER  --user's default
  MESH_PKI_DIR      --pki-dir's default
`make run PORTS=…` prints these for the ports it uses."""


@dataclass
class Outcome:
    ok: bool
    text: str  # the hop table, or the explanation of the failure
    status: int | None = None  # HTTP status, if the call got that far
    body: Any = None


def call(
    url: str,
    server_name: str,
    material: tls.TLSMaterial,
    check: CalleeCheck,
    timeout: float = 10.0,
    headers: dict[str, str] | None = None,
) -> Outcome:
    """One request, with a fresh connection; turns every kind of failure into a sentence."""
    context = tls.client_context(material)
    try:
        with httpx.Client(transport=sync_transport(context, check), timeout=timeout) as client:
            response = client.get(url, headers=headers, extensions={"sni_hostname": server_name})
    except httpx.HTTPError as e:
        reason = explain_transport_error(e, server_name, timeout, url)
        if closed_without_answer(e) and (revoked := own_revocation(material)):
            reason = f"{server_name} refused our certificate at the TLS layer: {revoked}"
        return Outcome(False, f"{'refused' if refused_at_tls(e) else 'failed'} before HTTP: {reason}")
    body = problem_body(response)
    if response.status_code == 200:
        if isinstance(body, dict) and "hops" in body:
            text = hop_table(body["hops"])
        else:  # /metrics is text (Prometheus's exposition format): printed as it came
            text = body if isinstance(body, str) else json.dumps(body)
        return Outcome(True, text, 200, body)
    return Outcome(False, explain_problem(response.status_code, body), response.status_code, body)


def user_token(token_url: str, material: tls.TLSMaterial, user: str, audience: str, timeout: float = 10.0) -> str:
    """As an edge: ask the token service for a token on behalf of `user`, for `audience`, bound to our
    certificate (the one on this connection). How the edge authenticated its user is out of scope here.
    Raises CannotAct with the token service's reason."""
    check = callee_check(authorize_id(default_server_id(TOKEN_SERVICE, material.cert)))
    form = {"grant_type": USER_GRANT, "user": user, "audience": audience}
    try:
        with httpx.Client(transport=sync_transport(tls.client_context(material), check), timeout=timeout) as client:
            response = client.post(token_url + "/token", data=form, extensions={"sni_hostname": TOKEN_SERVICE})
    except httpx.HTTPError as e:
        raise CannotAct(f"no user token: {explain_transport_error(e, TOKEN_SERVICE, timeout, token_url)}") from None
    body = problem_body(response)
    if response.status_code != 200 or not isinstance(body, dict) or "access_token" not in body:
        said = f"{body.get('error')}: {body.get('error_description')}" if isinstance(body, dict) else body
        raise CannotAct(f"no user token: {TOKEN_SERVICE} answered {response.status_code}: {said}")
    return str(body["access_token"])


class CannotAct(Exception):
    """What the client could not do, as a sentence."""


def default_server_id(server_name: str, *certificates: Path | None) -> SpiffeId:
    """spiffe://<our own trust domain>/<server name>, the trust domain read from the first of `certificates` that
    carries a SPIFFE ID: the one we present, then (when we present none, or a foreign one: an experiment) the
    client's own in the mesh's files. None of them: MaterialError, never a trust domain made up."""
    for path in certificates:
        if path is not None and path.exists():
            with contextlib.suppress(MaterialError):
                return peer_id(load_certificates(path)[0], path, server_name)
    last = next((path for path in reversed(certificates) if path is not None), None)
    return peer_id(None, last, server_name, "or give the server's SPIFFE ID with --server-id")


def default_server_name(url: str) -> str:
    """The name the callee's certificate must carry: the URL's host, unless that is an IP address."""
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return "service-a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description=__doc__,
        epilog=ENVIRONMENT.format(url=DEFAULT_URL, token_url=DEFAULT_TOKEN_URL),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(parser)
    parser.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"default: {DEFAULT_URL} (MESH_CLIENT_URL)")
    parser.add_argument(
        "--server-name",
        help="the identity the server must prove (TLS server name; its certificate must carry it as a DNS SAN). "
        "Default: the URL's host, or service-a when the host is an IP address",
    )
    parser.add_argument(
        "--server-id",
        help="the SPIFFE ID the server must present, checked after the handshake and before the request is sent. "
        "Default: spiffe://<our certificate's trust domain>/<server name>",
    )
    parser.add_argument("--pki-dir", type=Path, default=DEFAULT_OUT, help="default: pki/out")
    parser.add_argument("--cert", type=Path, help="our certificate (default: <pki-dir>/client.crt)")
    parser.add_argument("--key", type=Path, help="our private key (default: <pki-dir>/client.key)")
    parser.add_argument("--ca", type=Path, help="the CA we trust (default: <pki-dir>/ca.crt)")
    parser.add_argument("--crl", type=Path, help="revocation list to check the server against (<pki-dir>/crl.pem)")
    parser.add_argument("--no-cert", action="store_true", help="present no certificate at all")
    parser.add_argument(
        "--user",
        default=os.environ.get("MESH_CLIENT_USER") or None,
        help="call on behalf of USER: first get a user token from the token service (we are an edge), "
        "bound to our certificate, and send it along (default: MESH_CLIENT_USER, if set)",
    )
    parser.add_argument(
        "--token", help="send this token as `Authorization: Bearer TOKEN` (a token you got elsewhere, or a forged one)"
    )
    parser.add_argument(
        "--print-token", action="store_true", help="with --user: print the user token and stop (to read or reuse it)"
    )
    parser.add_argument(
        "--token-url",
        default=DEFAULT_TOKEN_URL,
        help=f"the token service (default: {DEFAULT_TOKEN_URL}, MESH_TOKEN_URL)",
    )
    parser.add_argument("--json", action="store_true", help="print the response body as JSON")
    parser.add_argument("--load", type=int, metavar="N", help="send N requests (keep-alive) and count failures")
    parser.add_argument("--concurrency", type=int, default=8, help="with --load: parallel connections (default 8)")
    parser.add_argument(
        "--during", metavar="COMMAND", help="with --load: run COMMAND meanwhile; keep the load on until it ends"
    )
    args = parser.parse_args(argv)
    for option, url in (("url", args.url), ("--token-url", args.token_url)):
        if urlsplit(url).scheme != "https":
            # httpx would send it in the clear, with no certificate on either side: not a call of this mesh.
            print(f"client: {option} {url}: not an https:// URL — the mesh speaks mutual TLS only", file=sys.stderr)
            return 2
    # A file named on the command line is the user's: `make pki` would not create it.
    for option, path in (("--cert", args.cert), ("--key", args.key), ("--ca", args.ca), ("--crl", args.crl)):
        if path is not None and not path.exists():
            print(f"client: {option} {path}: no such file — check the path", file=sys.stderr)
            return 2

    layout = Layout(args.pki_dir)
    material = tls.TLSMaterial(
        ca=args.ca or layout.ca_cert,
        cert=None if args.no_cert else (args.cert or layout.cert("client")),
        key=None if args.no_cert else (args.key or layout.key("client")),
        crl=args.crl or layout.crl,
    )
    server_name = args.server_name or default_server_name(args.url)
    try:
        expected = (
            SpiffeId.parse(args.server_id)
            if args.server_id
            else default_server_id(server_name, material.cert, layout.cert("client"))
        )
    except InvalidSpiffeId as e:
        print(f"client: --server-id {args.server_id}: {e}", file=sys.stderr)
        return 2
    except MaterialError as e:
        print(f"client: {e}", file=sys.stderr)
        return 2
    check = callee_check(authorize_id(expected))
    try:
        if args.load:
            return load(args.url, server_name, material, check, args.load, args.concurrency, args.during)
        token = user_token(args.token_url, material, args.user, server_name) if args.user else args.token
        if args.print_token:
            print(token or "no token: --print-token needs --user")
            return 0 if token else 2
        headers = {"Authorization": f"Bearer {token}"} if token else None
        outcome = call(args.url, server_name, material, check, headers=headers)
    except MaterialError as e:
        print(f"client: {e}", file=sys.stderr)
        return 2
    except CannotAct as e:
        print(e)
        return 1
    if args.json and outcome.body is not None:
        print(json.dumps(outcome.body, indent=2))
    else:
        print(outcome.text)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
