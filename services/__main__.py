"""`python -m services`: run one service, configured by `MESH_*` environment variables (see services/config.py).

It refuses to start — exit status 2 and one line naming the file and the fix — when its certificate, key,
CA, CRL or allow-list is missing or malformed: a service that cannot check its callers must not listen.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import sys
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from services.app import create_app
from services.config import ServiceConfig
from shared import tls
from shared.cli import add_version
from shared.inbound import raise_open_files_limit, tls_protocol
from shared.observability import log
from shared.x509 import MaterialError

AppFactory = Callable[[ServiceConfig, tls.LiveTLS], FastAPI]

# Above uvicorn's own keep-alive timeout (5 s) is never useful: see shared.outbound.KEEPALIVE_EXPIRY.
KEEP_ALIVE_SECONDS = 5


class CannotStart(Exception):
    """One line for stderr: what is wrong and what to do."""


def build(config: ServiceConfig, create: AppFactory = create_app) -> tuple[tls.LiveTLS, FastAPI]:
    """The service's TLS contexts and app (`create`: a service of the chain, or the token service), or CannotStart."""
    log.configure(config.name, config.log_level)
    try:
        live = tls.LiveTLS(
            config.tls,
            require_client_cert=config.client_cert == "required",
            outgoing=bool(config.downstream_url or config.token_service_url),
            profile=config.tls_profile,
        )
        return live, create(config, live)
    except MaterialError as e:
        raise CannotStart(f"{config.name}: cannot start: {e}") from None


def load_config() -> ServiceConfig:
    try:
        return ServiceConfig()  # type: ignore[call-arg]
    except ValidationError as e:
        problems = "; ".join(map(_problem, e.errors()))
        raise CannotStart(f"service: cannot start: {problems} (`python -m services --help` lists them all)") from None


def _problem(error: Any) -> str:
    """One configuration problem as a sentence: which variable, what it holds, what it should hold."""
    if not error["loc"]:  # a rule about several settings together: its message names them
        return str(error["msg"]).removeprefix("Value error, ")
    variable = f"MESH_{'_'.join(map(str, error['loc'])).upper()}"
    if error["type"] == "missing":
        return f"{variable} is not set" + (" (which service is this? e.g. service-a)" * (variable == "MESH_NAME"))
    expected = {"int_parsing": "a whole number", "float_parsing": "a number", "bool_parsing": "true or false"}
    return f"{variable}={os.environ.get(variable, '')!r} is not {expected.get(error['type']) or error['msg']}"


def parse_arguments(argv: list[str] | None = None) -> None:
    """No options but --help and --version: a service is configured by its environment, listed by --help."""
    settings = "\n".join(
        f"  MESH_{name.upper():<30} {'(required)' if field.is_required() else 'default: ' + _default(field)}"
        for name, field in ServiceConfig.model_fields.items()
    )
    parser = argparse.ArgumentParser(
        prog="python -m services",
        description=f"{__doc__}\nSettings, from the environment (docs/reference.md, Configuration):\n{settings}\n\n"
        "Example: MESH_NAME=service-c MESH_PORT=8445 python -m services",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(parser)
    parser.parse_args(argv)


def _default(field: Any) -> str:
    if field.default_factory is not None:
        return "computed at start"
    return "none" if field.default is None else str(field.default)


Protocol = Callable[..., asyncio.Protocol]  # a protocol class, or what makes one per connection (tls_protocol)


def serve(config: ServiceConfig, app: FastAPI, protocol: Protocol, scheme: str = "https") -> None:
    logging.getLogger("mesh").info(
        "starting",
        extra={
            "listen": f"{scheme}://{config.host}:{config.port}",
            "downstream": config.downstream_name,
            "client_cert": config.client_cert,
            "tls_profile": config.tls_profile,
            # raised to the hard limit at start (run()); the connection caps are sized from it
            "open_files": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "max_connections": config.max_connections,
            "max_handshakes": config.max_handshakes,
        },
    )
    # uvicorn gets no SSL settings: our protocol class terminates TLS itself (see shared.inbound.handshake), so
    # uvicorn would announce "http://"; our "starting" line above says what really listens.
    logging.getLogger("uvicorn.error").addFilter(lambda record: "Uvicorn running on" not in record.getMessage())
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        http=protocol,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        h11_max_incomplete_event_size=config.max_header_bytes,
        backlog=config.listen_backlog,
        ws="none",  # no route speaks WebSocket; shared.inbound.limits refuses every upgrade before uvicorn sees it
        log_config=None,  # keep log.configure's JSON lines
        server_header=False,
    )


def run(
    protocol_for: Callable[[ServiceConfig, tls.LiveTLS], tuple[Protocol, str]],
    create: AppFactory = create_app,
) -> int:
    """Configure, check and serve; `protocol_for` picks the HTTP protocol class and the scheme it speaks."""
    # Before the configuration, whose default max_connections is half of this limit. Under systemd or a
    # shell the soft limit is often 1,024 while the hard one is far higher: the flood would find the lower.
    parse_arguments()
    raise_open_files_limit()
    try:
        config = load_config()
        live, app = build(config, create)
    except CannotStart as e:
        print(e, file=sys.stderr)
        return 2
    protocol, scheme = protocol_for(config, live)
    serve(config, app, protocol, scheme)
    return 0


def main(create: AppFactory = create_app) -> int:
    return run(lambda config, live: (tls_protocol(lambda: live.server, config.limits, live.recheck), "https"), create)


if __name__ == "__main__":
    sys.exit(main())
