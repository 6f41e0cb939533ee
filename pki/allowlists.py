"""Rendering the policy into what the services read: allow-lists (one caller per line) and the token policy."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pki.output import write_file
from pki.policy import Policy
from shared.layout import Layout
from shared.x509 import load_certificates, thumbprint

__all__ = ["expected_allow_lists", "render_allow_lists", "render_token_policy", "rendered_allow_lists"]


def render_allow_lists(layout: Layout, policy: Policy) -> None:
    """Turn the policy's names into allow-lists, one file per service, one caller per line: its thumbprints
    (current, and next or previous during a rotation), or with `authorize_by = "spiffe-id"` its SPIFFE ID."""
    for path, text in rendered_allow_lists(layout, policy).items():
        write_file(path, text)
    render_token_policy(layout, policy)


def rendered_allow_lists(layout: Layout, policy: Policy) -> dict[Path, bytes]:
    """Each allow-list file as `render_allow_lists` writes it now (`pki check` compares them to the files)."""
    files = {}
    for callee in policy.services:
        header = f"Allow-list of {callee}: the callers whose certificate may call it."
        files[layout.allow_list(callee)] = _render(layout, policy, header, policy.allow.get(callee, ()))
    header = "Who may read GET /metrics on every service."
    files[layout.metrics_allow_list] = _render(layout, policy, header, policy.metrics)
    return files


def render_token_policy(layout: Layout, policy: Policy) -> None:
    """tokens.json: what the token service may grant. Names only — it changes with the policy, never on renewal."""
    document = {
        "comment": "Rendered from pki/policy.toml by `python -m pki`; edit the policy, then run `make pki`.",
        "trust_domain": policy.trust_domain,
        "lifetime_seconds": int(policy.token_lifetime.total_seconds()),
        "edges": list(policy.edges),
        "users": {user: list(scopes) for user, scopes in policy.users.items()},
        "may_call": {caller: list(callees) for caller, callees in policy.may_call().items()},
    }
    write_file(layout.tokens_policy, (json.dumps(document, indent=2) + "\n").encode())


def expected_allow_lists(layout: Layout, policy: Policy) -> dict[str, list[tuple[str, str]]]:
    """What the policy says each allow-list file (by name: `service-a.txt`, `metrics.txt`) holds now: its
    (value, comment) lines. `make pki` writes exactly these; `pki check` and `cockpit status` compare to them."""
    lists = {layout.allow_list(callee).name: policy.allow.get(callee, ()) for callee in policy.services}
    lists[layout.metrics_allow_list.name] = policy.metrics
    return {name: _entries(layout, policy, callers) for name, callers in lists.items()}


def _entries(layout: Layout, policy: Policy, callers: Iterable[str]) -> list[tuple[str, str]]:
    if policy.authorize_by == "spiffe-id":
        return [(policy.spiffe_id(caller), caller) for caller in callers]
    entries = []
    for caller in callers:
        for cert, note in [
            (layout.cert(caller), ""),
            (layout.next_cert(caller), " (next: rotation under way)"),
            (layout.previous_cert(caller), " (previous: until `pki retire`)"),
        ]:
            if cert.exists():
                leaf = load_certificates(cert)[0]
                entries.append((thumbprint(leaf), f"{caller} {policy.spiffe_id(caller)}{note}"))
    return entries


def _render(layout: Layout, policy: Policy, header: str, callers: Iterable[str]) -> bytes:
    lines = [
        f"# {header}",
        "# Rendered from pki/policy.toml by `python -m pki`; edit the policy, then run `make pki`.",
        "# Format: one SHA-256 certificate thumbprint per line (64 hex digits, colons allowed);",
        "# '#' starts a comment. An empty list admits nobody.",
    ]
    if policy.authorize_by == "spiffe-id":
        lines[2] = (
            "# Format: one SPIFFE ID (any valid certificate of ours for that name) or SHA-256 thumbprint per line;"
        )
    lines += [f"{value}  # {comment}" for value, comment in _entries(layout, policy, callers)]
    return ("\n".join(lines) + "\n").encode()
