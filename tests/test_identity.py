"""kdstore/identity.py: the "same settings or refuse" check of everything that resumes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kdstore.errors import ConfigError, KDStoreError
from kdstore.identity import check_same, differences


def test_differences_name_nested_keys_with_both_values():
    saved = {"dim": 8, "settings": {"source": {"path": "/a", "size": 3}, "fps": 2.0}, "gone": 1}
    now = {"dim": 8, "settings": {"source": {"path": "/b", "size": 3}, "fps": 2.0}, "new": [1, 2]}
    diff = differences(saved, now)
    assert [(k, x, y) for k, x, y in diff if k != "gone" and k != "new"] == [("settings.source.path", "/a", "/b")]
    assert [k for k, _, _ in diff] == ["gone", "new", "settings.source.path"]
    assert repr(dict((k, x) for k, x, _ in diff)["new"]) == "(absent)"
    assert differences(saved, now, ignore=("gone", "new", "settings.source.path")) == []


def test_a_tuple_is_the_list_it_was_saved_as():
    now = {"config": {"hist": (1, 2), "lr": 0.1}}
    assert differences(json.loads(json.dumps(now)), now) == []
    assert differences({"config": {"hist": [1, 3]}}, {"config": {"hist": (1, 2)}}) == [("config.hist", [1, 3], [1, 2])]


def test_check_same_refuses_with_every_differing_key():
    with pytest.raises(ConfigError) as e:
        check_same({"a": 1, "c": {"lr": 0.1}}, {"a": 2, "c": {"lr": 0.2}}, "/run: checkpoint of another run",
                   hint="use a new run directory")
    assert str(e.value) == "/run: checkpoint of another run (a: saved 1, now 2; c.lr: saved 0.1, now 0.2); use a new run directory"
    with pytest.raises(KDStoreError, match=r"^/d: other settings \(x: saved 1, now 2\)$"):
        check_same({"x": 1}, {"x": 2}, "/d: other settings", error=KDStoreError)
    check_same({"c": {"epochs": 3, "lr": 0.1}}, {"c": {"epochs": 5, "lr": 0.1}}, "x", ignore=("c.epochs",))


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=3),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                           max_leaves=8)


@given(st.dictionaries(st.text(max_size=3), json_values, max_size=4), st.dictionaries(st.text(max_size=3), json_values, max_size=4))
def test_no_differences_exactly_when_equal(a, b):
    assert (differences(a, b) == []) == (a == b)
    assert differences(a, a) == []
