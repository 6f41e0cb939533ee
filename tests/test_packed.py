"""The packed sets a reload hands over (shared.packed): the same answers as a frozenset and a dict would give."""

from __future__ import annotations

import pickle
import random

import pytest

from shared.packed import PackedKeys, Pins, Serials

pytestmark = pytest.mark.fast


def test_serials_answer_as_a_set_of_ints_would() -> None:
    revoked = {random.getrandbits(159) for _ in range(1000)} | {0, 1, -1, 2**159 - 1, -(2**159)}
    serials = pickle.loads(pickle.dumps(Serials.of(revoked)))
    assert len(serials) == len(revoked) and set(serials) == revoked
    assert all(serial in serials for serial in revoked)
    others = {random.getrandbits(159) for _ in range(1000)} - revoked
    assert not any(serial in serials for serial in [*others, 2**200, -(2**200), "1", 1.0 + 0.5])
    assert serials - Serials.of(revoked - {0, 1}) == {0, 1}
    with pytest.raises(ValueError, match="longer than RFC 5280 allows"):
        Serials.of([2**168])


def test_pins_answer_as_a_dict_of_thumbprints_would() -> None:
    labels = {f"{random.getrandbits(256):064x}": f"caller {i}" for i in range(1000)} | {"0" * 64: ""}
    pins = pickle.loads(pickle.dumps(Pins(labels)))
    assert pins == labels and dict(pins) == labels and len(pins) == len(labels) and sorted(pins) == sorted(labels)
    assert all(pins[key] == label and key in pins for key, label in labels.items())
    some = next(iter(labels))
    for missing in ["f" * 64, "0" * 63, "not hex", "", "0" * 66, some.upper(), " ".join([some[:2], some[2:63]]), 1]:
        assert missing not in pins and pins.get(missing) is None  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="64 hex digits"):
        Pins({"ab" * 31: "short"})


def test_nothing_is_in_an_empty_set() -> None:
    """An allow-list of names only has no pins: the empty string was once "listed" in it (found by a review)."""
    for empty in (Pins({}), Serials.of([]), PackedKeys.of([], 32)):
        assert not any(key in empty for key in ["", b"", 0, "0" * 64, b"\0" * 32])  # type: ignore[operator]
    assert Pins({}).get("") is None and "\ud800" * 64 not in Pins({"0" * 64: ""})


def test_packed_keys_are_sorted_distinct_and_of_one_width() -> None:
    keys = PackedKeys.of([b"bb", b"aa", b"bb"], 2)
    assert list(keys) == [b"aa", b"bb"] and keys.find(b"bb") == 1 and keys.find(b"ab") is None
    assert b"aa" in keys and b"a" not in keys and "aa" not in keys
    with pytest.raises(ValueError, match="2 bytes"):
        PackedKeys.of([b"abc"], 2)
