"""Where the applier commits between entries: the window's answers, against a plain model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stead.replication.commit_order import Window, segments
from stead.replication.entries import Entry, Op

ROOT = "/srv/lab"
PATHS = ["a", "b", "a/x", "a/y", "b/x", "c", "c/d", "c/d/e"]


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:depth]) for depth in range(1, len(parts))]


def _related(a: str, b: str) -> bool:
    """Equal, or one above the other."""
    return a == b or a in _parents(b) or b in _parents(a)


class Model:
    """The window's rules spelled out over lists: slow and plain."""

    def __init__(self) -> None:
        self.touched: list[str] = []
        self.gone: list[str] = []

    def conflicts(self, entry: Entry) -> bool:
        if any(_related(entry.path, g) for g in self.gone):
            return True
        if entry.op is not Op.RENAME:
            return False
        return (
            any(_related(entry.target, g) for g in self.gone)
            or any(_related(entry.target, t) for t in self.touched)
            or any(entry.path in _parents(t) for t in self.touched)
        )

    def note(self, entry: Entry) -> None:
        self.touched.append(entry.path)
        if entry.op is Op.RENAME:
            self.touched.append(entry.target)
            self.gone.append(entry.path)


entries = st.one_of(
    st.builds(lambda p: Entry(Op.FILE, ROOT, p, data=b"x", size=1), st.sampled_from(PATHS)),
    st.builds(lambda p: Entry(Op.DELETE, ROOT, p), st.sampled_from(PATHS)),
    st.builds(lambda p: Entry(Op.MKDIR, ROOT, p), st.sampled_from(PATHS)),
    st.builds(
        lambda p, t: Entry(Op.RENAME, ROOT, p, target=t),
        st.sampled_from(PATHS),
        st.sampled_from(PATHS),
    ),
)


@settings(max_examples=300)
@given(st.lists(entries, max_size=25))
def test_the_window_answers_as_the_plain_rules_do(stream: list[Entry]) -> None:
    window, model = Window(), Model()
    for entry in stream:
        assert window.conflicts(entry) == model.conflicts(entry), entry
        window.note(entry)
        model.note(entry)


def test_a_stream_without_renames_is_one_segment() -> None:
    records = [(i, Entry(Op.FILE, ROOT, f"d/{i}", data=b"x", size=1)) for i in range(1, 500)]
    assert [(len(seg), before, after) for seg, before, after in segments(records)] == [
        (499, False, False)
    ]


def test_a_rename_over_something_touched_commits_first() -> None:
    records = [
        (1, Entry(Op.FILE, ROOT, "a/x", data=b"x", size=1)),
        (2, Entry(Op.DELETE, ROOT, "b")),
        (3, Entry(Op.RENAME, ROOT, "a", target="b")),
        (4, Entry(Op.FILE, ROOT, "a", data=b"new", size=3)),
    ]
    split = [([seq for seq, _ in seg], before) for seg, before, _ in segments(records)]
    assert split == [([1, 2], False), ([3], True), ([4], True)]
