"""Counters and gauges in the Prometheus text format: what was allowed, what was refused and why, by whom.

Why not `prometheus_client`: every sample here carries the service's name as a constant label, which that
library does not offer (it leaves it to relabelling, or to a custom collector longer than this module); a
process serves one service, counters only go up, and the text format is simple
(https://prometheus.io/docs/instrumenting/exposition_formats/).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

_registry: list[Counter | Gauge] = []


class Counter:
    def __init__(self, name: str, help_text: str, labels: Sequence[str]) -> None:
        self.name, self.help_text, self.labels = name, help_text, tuple(labels)
        self.values: defaultdict[tuple[str, ...], int] = defaultdict(int)
        _registry.append(self)

    def inc(self, **labels: str) -> None:
        self.values[tuple(labels[label] for label in self.labels)] += 1

    def render(self, constant: dict[str, str]) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} counter"]
        for key, value in sorted(self.values.items()):
            pairs = {**constant, **dict(zip(self.labels, key, strict=True))}
            rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items())
            lines.append(f"{self.name}{{{rendered}}} {value}")
        return lines


class Gauge:
    """A value read when scraped, e.g. how long until the CRL expires; `read` returns None when there is none.

    With `label`, `read` returns one value per label value instead: {"CN=…Intermediate CA": 1234.0, …}.
    """

    def __init__(
        self, name: str, help_text: str, read: Callable[[], float | dict[str, float] | None], label: str | None = None
    ) -> None:
        self.name, self.help_text, self.read, self.label = name, help_text, read, label
        _registry.append(self)

    def render(self, constant: dict[str, str]) -> list[str]:
        value = self.read()
        if value is None or value == {}:
            return []
        samples = sorted(value.items()) if isinstance(value, dict) else [(None, value)]
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} gauge"]
        for label_value, sample in samples:
            pairs = constant if label_value is None else {**constant, self.label or "label": label_value}
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items())
            lines.append(f"{self.name}{{{labels}}} {sample:g}")
        return lines


def exposition(**constant: str) -> str:
    """Every counter of this process, with `constant` labels (the service's name) on every sample."""
    return "\n".join(line for counter in _registry for line in counter.render(constant)) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
