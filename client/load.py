"""`python -m client --load N [--during COMMAND]`: a steady load of keep-alive calls, and how many failed."""

from __future__ import annotations

import contextlib
import subprocess
import threading

import httpx

from client.explain import explain_problem, problem_body
from shared import tls
from shared.outbound import CalleeCheck, explain_transport_error, sync_transport
from shared.x509 import MaterialError

__all__ = ["load"]


def load(
    url: str,
    server_name: str,
    material: tls.TLSMaterial,
    check: CalleeCheck,
    total: int,
    concurrency: int,
    during: str | None,
) -> int:
    """A steady load: `total` requests at least, and for as long as `during` runs; prints how many failed.

    Like a long-running service, it takes a renewed certificate as soon as its files change: each worker
    then opens new connections with it (a renewal by thumbprint unlists the old one shortly after).
    """
    command = subprocess.Popen(during, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) if during else None
    sent, failures, lock = 0, [], threading.Lock()

    def busy() -> bool:
        return sent < total or (command is not None and command.poll() is None)

    def version() -> tuple[int, ...]:
        return tuple(path.stat().st_mtime_ns for path in material.files())

    def worker() -> None:
        nonlocal sent
        seen, client = version(), httpx.Client(transport=sync_transport(tls.client_context(material), check))
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(lambda: client.close())
            while True:
                with lock:
                    if not busy():
                        return
                    sent += 1
                if (now := version()) != seen:  # new certificate, key or CRL: new connections from now on
                    with contextlib.suppress(MaterialError):  # half-written (key before certificate): next time
                        fresh = httpx.Client(transport=sync_transport(tls.client_context(material), check))
                        client.close()
                        seen, client = now, fresh
                try:
                    response = client.get(url, extensions={"sni_hostname": server_name}, timeout=10)
                    if response.status_code != 200:
                        failures.append(explain_problem(response.status_code, problem_body(response)))
                except httpx.HTTPError as e:
                    failures.append(explain_transport_error(e, server_name, 10, url))
                except Exception as e:  # a worker that dies must still count as a failure
                    failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if command is not None:
        print(command.communicate()[0].decode(errors="replace").rstrip())
    print(f"{sent} requests{f' while `{during}` ran' if during else ''}: {len(failures)} failed")
    for failure in failures[:3]:
        print(f"  {failure}")
    return 0 if not failures and (command is None or command.returncode == 0) else 1
