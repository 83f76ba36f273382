"""engine/mapoptions.py: every option of one map, typed and validated once."""
from __future__ import annotations

import dataclasses
import re

import pytest

from poolmagic.engine.mapoptions import MapOptions, cli_fields
from poolmagic.errors import BadInputError

FIELDS = [f.name for f in dataclasses.fields(MapOptions)]


def test_defaults():
    o = MapOptions()
    assert o.star is False and o.keep_going is False
    for name in ("chunksize", "workers", "timeout", "kwargs", "repeat", "seed", "threads", "max_memory"):
        assert getattr(o, name) is None, name
    assert o == MapOptions.from_kwargs({})


def test_accepted_values_are_kept():
    o = MapOptions(star=True, chunksize=5, workers=3, timeout=0.5, keep_going=True, kwargs={"y": [1, 2]},
                   repeat=4, seed=0, threads=2, max_memory=1 << 30)
    assert (o.star, o.chunksize, o.workers, o.timeout, o.keep_going) == (True, 5, 3, 0.5, True)
    assert (o.kwargs, o.repeat, o.seed, o.threads, o.max_memory) == ({"y": [1, 2]}, 4, 0, 2, 1 << 30)
    assert MapOptions(timeout=3).timeout == 3  # an int number of seconds is a number


@pytest.mark.parametrize(
    "field, value",
    [
        ("workers", 0), ("workers", -1), ("workers", True), ("workers", "2"), ("workers", 2.0),
        ("timeout", 0), ("timeout", -1), ("timeout", -0.5), ("timeout", True), ("timeout", "5"),
        ("seed", -1), ("seed", True), ("seed", 1.5), ("seed", "1"),
        ("chunksize", 0), ("chunksize", -3), ("chunksize", False),
        ("threads", 0), ("threads", "auto"),
        ("repeat", 0),
        ("max_memory", "lots"), ("max_memory", 0), ("max_memory", -1), ("max_memory", True), ("max_memory", "0MB"),
        ("star", 1), ("star", "yes"), ("keep_going", 0),
        ("kwargs", [("y", 1)]), ("kwargs", {1: 2}),
    ],
)
def test_bad_values_name_their_field(field, value):
    with pytest.raises(BadInputError) as ei:
        MapOptions(**{field: value})
    assert field in str(ei.value), f"{ei.value} does not name {field}"
    assert isinstance(ei.value, ValueError)  # BadInputError is a ValueError too


def test_with_checks_the_new_value_too():
    with pytest.raises(BadInputError, match="workers"):
        MapOptions().with_(workers=0)


def test_messages_say_what_is_expected():
    with pytest.raises(BadInputError, match=r"workers must be a whole number, at least 1, not 0"):
        MapOptions(workers=0)
    with pytest.raises(BadInputError, match=r"timeout must be a number more than 0, not -1"):
        MapOptions(timeout=-1)
    with pytest.raises(BadInputError, match=r"seed must be a non-negative whole number, not True"):
        MapOptions(seed=True)
    with pytest.raises(BadInputError, match=r"max_memory must be a size such as 500MB or 4GB, not 'lots'"):
        MapOptions(max_memory="lots")


@pytest.mark.parametrize(
    "size, expected",
    [
        ("500MB", 500 * 2**20),
        ("500mb", 500 * 2**20),
        ("4GB", 4 * 2**30),
        ("1.5G", int(1.5 * 2**30)),
        ("2GiB", 2 * 2**30),
        ("64K", 64 * 2**10),
        (" 3 GB ", 3 * 2**30),
        ("1000", 1000),
        (1000, 1000),
        (1 << 33, 1 << 33),
    ],
)
def test_max_memory_sizes(size, expected):
    o = MapOptions(max_memory=size)
    assert o.max_memory == expected
    assert type(o.max_memory) is int


def test_max_memory_stays_a_number_through_with_():
    o = MapOptions(max_memory="4GB").with_(seed=1)
    assert o.max_memory == 4 * 2**30 and o.seed == 1


def test_from_kwargs_builds_the_options():
    assert MapOptions.from_kwargs({"timeout": 2, "seed": 5}) == MapOptions(timeout=2, seed=5)


def test_from_kwargs_names_an_unknown_keyword_and_lists_the_known_ones():
    with pytest.raises(BadInputError) as ei:
        MapOptions.from_kwargs({"timeot": 5, "seed": 1})
    msg = str(ei.value)
    assert "'timeot'" in msg
    for name in FIELDS:
        assert re.search(rf"\b{name}\b", msg), f"{name} missing from {msg!r}"


def test_from_kwargs_still_validates_values():
    with pytest.raises(BadInputError, match="chunksize"):
        MapOptions.from_kwargs({"chunksize": 0})


def test_frozen():
    o = MapOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.workers = 3  # type: ignore[misc]
    assert o.workers is None


def test_with_returns_a_changed_copy():
    o = MapOptions(seed=1, kwargs={"y": 2})
    p = o.with_(kwargs=None, timeout=4.0)
    assert p is not o
    assert (p.seed, p.kwargs, p.timeout) == (1, None, 4.0)
    assert (o.seed, o.kwargs, o.timeout) == (1, {"y": 2}, None)
    assert o.with_() == o


def test_equal_options_are_equal_and_hashable_when_plain():
    assert MapOptions(seed=1, workers=2) == MapOptions(workers=2, seed=1)
    assert hash(MapOptions(seed=1)) == hash(MapOptions(seed=1))


def test_cli_fields_have_names_help_and_keep_declaration_order():
    cli = cli_fields()
    assert [f.name for f in cli] == [n for n in FIELDS if n in {f.name for f in cli}]
    for f in cli:
        assert all(n.startswith("-") for n in f.metadata["names"]), f.name
        assert f.metadata["help"], f.name
    assert {"star", "chunksize", "workers", "timeout", "keep_going", "seed", "threads", "max_memory"} <= {
        f.name for f in cli
    }


def test_retry_on_without_retries_is_refused():
    """``--retry-on ValueError`` alone retried nothing, silently: it only limits --retries N."""
    with pytest.raises(BadInputError, match=r"--retry-on.*--retries N"):
        MapOptions(retry_on=(ValueError,))
    assert MapOptions(retries=2, retry_on=(ValueError,)).retry_on == (ValueError,)
