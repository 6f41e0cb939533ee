"""`python -m tests.rigged_token_service`: the real token service, except that its first signing key is one the
tests know (a JWK file named by MESH_TEST_SIGNING_KEY).

With it, an attack test can sign a token that breaks exactly one rule — an expired one, a wrong `typ`, a `crit`
header — and show the service refusing it *for that reason*, not just for a bad signature. Everything else is
`services.token_service` unchanged: this lives in tests/, so the service code has no switch for it.
"""

import json
import os
import sys
from pathlib import Path

from joserfc.jwk import ECKey

from services import signing
from services.__main__ import main
from services.token_service import create_token_app


def rig() -> None:
    known = [ECKey.import_key(json.loads(Path(os.environ["MESH_TEST_SIGNING_KEY"]).read_text()))]
    fresh = signing.SigningKeys._new_key
    signing.SigningKeys._new_key = staticmethod(lambda: known.pop() if known else fresh())  # type: ignore[method-assign]


if __name__ == "__main__":
    rig()
    sys.exit(main(create_token_app))
