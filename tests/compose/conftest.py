"""The compose stack, once per authorization mode: every compose test runs against both."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.compose.stack import ROOT, Stack, running_stack


@pytest.fixture(scope="session", params=["thumbprint", "spiffe-id"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp(f"compose-{request.param}")
    policy = tmp / "policy.toml"
    text = (ROOT / "pki" / "policy.toml").read_text()
    policy.write_text(text.replace('authorize_by = "thumbprint"', f'authorize_by = "{request.param}"'))
    with running_stack(tmp, policy) as stack:
        yield stack
