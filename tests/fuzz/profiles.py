"""Hypothesis profiles for the fuzz tests: a short, reproducible run in `make test`, a long one in `make fuzz`.

`HYPOTHESIS_PROFILE=ci` (the default) runs each property on a few fixed examples (derandomized: the same
ones every run, no example database), so that a failure in `make test` reproduces on any machine.
`HYPOTHESIS_PROFILE=fuzz` (`make fuzz`) draws fresh examples, many more of them, and keeps the failing ones in
.hypothesis/ (not committed) so that the next run tries them first.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
# How many more examples `make fuzz` tries than `make test`, for every property alike.
FUZZ_FACTOR = 20

# deadline=None: on a loaded 2-core machine one example can take a second without anything being wrong.
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(PROFILE)


def examples(short_run: int) -> settings:
    """The settings for one property: `short_run` examples in `make test`, FUZZ_FACTOR times as many in `make fuzz`."""
    return settings(max_examples=short_run * (FUZZ_FACTOR if PROFILE == "fuzz" else 1))
