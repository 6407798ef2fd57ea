"""Include/exclude filters: glob semantics, decisions with their rule, and the walk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stead.errors import ConfigError
from stead.replication.filters import Decision, Filter


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("*.tmp", "x.tmp", True),
        ("*.tmp", "a/b/x.tmp", True),  # no slash: any depth
        ("*.tmp", "x.tmpl", False),
        ("a/*.c", "a/x.c", True),
        ("a/*.c", "a/b/x.c", False),  # * stays within one component
        ("a/?.c", "a/x.c", True),
        ("a/?.c", "a/xy.c", False),
        ("**/x", "x", True),
        ("**/x", "p/q/x", True),
        ("a/**", "a", True),
        ("a/**", "a/b/c", True),
        ("a/**", "ab", False),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a/**/b", "a/x/y/bb", False),
        ("etc/nginx", "etc/nginx/sites/default", True),  # a directory with its subtree
        ("etc/nginx", "etc/nginx2", False),
        ("a/**/**/b", "a/x/b", True),
        ("x[1].c", "x[1].c", True),  # only * ? ** are special
    ],
)
def test_glob_semantics(pattern: str, path: str, expected: bool) -> None:
    assert Filter(include=[pattern]).protected(path, is_dir=False) is expected


def test_decide_names_the_rule() -> None:
    filt = Filter(include=["data/**", "etc/*.conf"], exclude=["*.tmp", "data/cache"])
    assert filt.decide("data/x", False) == Decision(True, 'include "data/**"')
    assert filt.decide("data/x.tmp", False) == Decision(False, 'exclude "*.tmp"')
    assert filt.decide("data/cache/deep/file", False) == Decision(False, 'exclude "data/cache"')
    assert filt.decide("other", True) == Decision(False, "default")
    assert filt.decide("etc", True) == Decision(True, 'include "etc/*.conf" (parent)')
    assert filt.decide("etc/sub", True).protected is False  # cannot hold etc/*.conf
    assert filt.decide("etc/a.conf", False).protected is True
    assert filt.decide(".stead", True) == Decision(False, "reserved")
    assert filt.decide(".stead/staging/x", False) == Decision(False, "reserved")
    assert Filter().decide("a/.stead", True).protected is True  # reserved only at the root


def test_traversal_of_double_star_patterns() -> None:
    filt = Filter(include=["**/logs/*.log"])
    assert filt.protected("a/b/c", is_dir=True)  # could hold a/b/c/logs/x.log
    assert filt.protected("a/logs/x.log", is_dir=False)
    assert not filt.protected("a/logs/x.txt", is_dir=False)


def test_bad_patterns_are_refused() -> None:
    with pytest.raises(ConfigError):
        Filter(include=["a/../b"])
    with pytest.raises(ConfigError):
        Filter(exclude=["/"])


def test_walk_is_sorted_parents_first_and_filtered(tmp_path: Path) -> None:
    for rel in ["b/2", "b/1", "a", "c.tmp", "d/cache/x", "d/e/f"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rel)
    (tmp_path / ".stead").mkdir()
    (tmp_path / "link").symlink_to("b")  # not followed
    filt = Filter(exclude=["*.tmp", "d/cache"])
    walked = [rel for rel, _ in filt.walk(tmp_path)]
    assert walked == ["a", "b", "b/1", "b/2", "d", "d/e", "d/e/f", "link"]
    assert [rel for rel, _ in filt.walk(tmp_path, under="d")] == ["d/e", "d/e/f"]


def test_walk_keeps_non_utf8_names(tmp_path: Path) -> None:
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    with open(raw, "wb") as handle:
        handle.write(b"x")
    (name,) = [rel for rel, _ in Filter().walk(tmp_path)]
    assert os.fsencode(name) == b"caf\xe9"


names = st.sampled_from(["a", "b", "x.tmp", "data", "cache", "c.log"])
paths = st.lists(names, min_size=1, max_size=4).map("/".join)


@given(path=paths)
def test_a_path_under_an_excluded_directory_is_excluded(path: str) -> None:
    filt = Filter(exclude=["cache", "*.tmp"])
    parts = path.split("/")
    for depth in range(1, len(parts)):
        if not filt.protected("/".join(parts[:depth]), is_dir=True):
            assert not filt.protected(path, is_dir=False)


@given(path=paths)
def test_included_paths_have_traversed_parents(path: str) -> None:
    filt = Filter(include=["data/**", "**/*.log", "a/b"])
    if filt.protected(path, is_dir=False):
        parts = path.split("/")
        for depth in range(1, len(parts)):
            assert filt.protected("/".join(parts[:depth]), is_dir=True), path
