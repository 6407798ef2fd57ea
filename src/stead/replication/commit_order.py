"""Where the applier must commit between entries, so that a replay never undoes one.

The applier (:mod:`stead.replication.applier`) applies a batch in segments; a replay after
a crash re-applies everything since the last commit. :func:`segments` splits a batch where
entries replayed together would undo each other; :class:`Window` tracks what the entries
since the last commit touched and renamed away.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from stead.replication.entries import Entry, Op

Record = tuple[int, Entry]


def segments(records: Sequence[Record]) -> Iterator[tuple[list[Record], bool, bool]]:
    """Split a batch into segments: (records, commit before, commit after).

    A replay re-applies everything since the last commit, so a commit must separate
    entries that would undo each other when replayed together (see :class:`Window`):
    a ``RENAME`` whose target, or anything below its source, was touched since the last
    commit, and anything that touches a name a ``RENAME`` since then moved away. A ``LINK``
    is committed alone. A staging file whose ``last`` part is in a segment cannot take a new
    ``first`` part in the same segment, because phase 1 would overwrite it before phase 2
    renames it into place.
    """
    current: list[Record] = []
    finished: set[tuple[str, str]] = set()
    window = Window()
    before = False
    for seq, entry in records:
        key = (entry.root, entry.path)
        if entry.op is Op.LINK:
            if current:
                yield current, before, False
            current, finished, window, before = [], set(), Window(), False
            yield [(seq, entry)], True, True
            continue
        if window.conflicts(entry):
            if current:
                yield current, before, False
            current, finished, window, before = [], set(), Window(), True
        if entry.op is Op.FILE:
            if key in finished:
                yield current, before, False
                current, finished, before = [], set(), False
            if entry.last:
                finished.add(key)
        current.append((seq, entry))
        window.note(entry)
    if current:
        yield current, before, False


class Window:
    """What the entries since the last commit touched, and the names they renamed away.

    Replaying ``[delete B, rename A->B]`` would delete the renamed data, replaying
    ``[file A/x, rename A->B]`` would recreate ``A`` and move it over ``B``, and replaying
    ``[rename A->B, file A]`` would move the new ``A`` over ``B``. So a ``RENAME A->B``
    conflicts with the window when ``B`` (or anything above or below it), or anything
    strictly below ``A``, was touched, or when ``A`` or ``B`` meets a name renamed away;
    any other entry conflicts when its path meets a name renamed away. Everything else
    replays harmlessly: a rename whose source is gone is a no-op, and the other kinds
    converge. Lookups go by path and by each parent, never through the whole window.

    Only a ``RENAME`` asks about the parents of touched paths, so they are worked out when
    one comes (a stream without renames notes each path in one set), and nothing is asked
    about names renamed away while there are none.
    """

    def __init__(self) -> None:
        self._touched: set[tuple[str, str]] = set()
        self._above_touched: set[tuple[str, str]] = set()  # strict parents of touched paths
        self._unexpanded: list[tuple[str, str]] = []  # touched, parents not yet added above
        self._gone: set[tuple[str, str]] = set()
        self._above_gone: set[tuple[str, str]] = set()

    def conflicts(self, entry: Entry) -> bool:
        key = (entry.root, entry.path)
        if self._meets_gone(key):
            return True
        if entry.op is not Op.RENAME:
            return False
        self._expand()
        target = (entry.root, entry.target)
        return (
            self._meets_gone(target)
            or _meets(target, self._touched, self._above_touched)
            or key in self._above_touched
        )

    def note(self, entry: Entry) -> None:
        key = (entry.root, entry.path)
        self._touched.add(key)
        self._unexpanded.append(key)
        if entry.op is Op.RENAME:
            target = (entry.root, entry.target)
            self._touched.add(target)
            self._unexpanded.append(target)
            self._add(key, self._gone, self._above_gone)

    def _expand(self) -> None:
        for key in self._unexpanded:
            self._above_touched.update(_parents(key))
        self._unexpanded.clear()

    def _meets_gone(self, key: tuple[str, str]) -> bool:
        return bool(self._gone) and _meets(key, self._gone, self._above_gone)

    @staticmethod
    def _add(
        key: tuple[str, str], exact: set[tuple[str, str]], above: set[tuple[str, str]]
    ) -> None:
        exact.add(key)
        above.update(_parents(key))


def _meets(key: tuple[str, str], exact: set[tuple[str, str]], above: set[tuple[str, str]]) -> bool:
    """``key`` is in ``exact``, above something in it, or below something in it."""
    return key in exact or key in above or any(parent in exact for parent in _parents(key))


def _parents(key: tuple[str, str]) -> list[tuple[str, str]]:
    root, path = key
    parts = path.split("/")
    return [(root, "/".join(parts[:depth])) for depth in range(1, len(parts))]
