"""`python docs/own_server/behind_a_proxy.py PROXY_PORT APP_PORT`: nginx terminating mTLS, a plaintext app behind it.

Fills in nginx.conf.template (beside this file) with the ports and pki/out, then runs nginx and the app
(`docs.own_server.app` under uvicorn, plain HTTP on 127.0.0.1:APP_PORT) until interrupted. The app trusts the
`X-Client-Cert` header nginx sets — which is the pitfall the walkthrough demonstrates.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).parent
PKI = HERE.parents[1] / "pki" / "out"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(a.isdigit() for a in argv):
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        print("behind_a_proxy: nginx is not installed (Debian: apt-get install nginx-light)", file=sys.stderr)
        return 2
    proxy_port, app_port = argv
    with tempfile.TemporaryDirectory(prefix="mesh-proxy-") as run:
        config = Path(run) / "nginx.conf"
        template = (HERE / "nginx.conf.template").read_text()
        config.write_text(template.format(run=run, pki=PKI.resolve(), proxy_port=proxy_port, app_port=app_port))
        app = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "docs.own_server.app:app", "--host", "127.0.0.1", "--port", app_port],
            cwd=HERE.parents[1],
        )
        proxy = subprocess.Popen([nginx, "-p", run, "-c", str(config)])
        try:
            while not stop.wait(0.5) and proxy.poll() is None and app.poll() is None:
                pass
        finally:
            for process in (proxy, app):
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
    return 0


if __name__ == "__main__":
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    sys.exit(main(sys.argv[1:]))
