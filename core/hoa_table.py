"""A home-address table that remembers its recent changes.

The SA store keeps ``home address (text) -> mn_id`` for every live SA and
hands it to the HoA allocator on every bootstrap.  Copying or re-parsing that
table per bootstrap made each bootstrap cost O(live SAs); with this table the
allocator reads only what changed since it last looked
(:meth:`HoATable.changes_since`) and keeps its own indexes up to date.

The journal is bounded: once it holds more entries than an eighth of the
table plus a margin, its older half is dropped, and a reader that had not caught up sees
``None`` and rebuilds from the whole table (rare: the allocator reads on every
bootstrap).
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from typing import Any

_MARGIN = 1024


class HoATable(Mapping[str, str]):
    """``Mapping[str, str]`` of live home addresses -> ``mn_id``, with a change journal.

    ``token`` identifies this table: a reader that saw another table (the
    store rebuilt its view) must rebuild.  ``seq`` counts changes since the
    table was created; :meth:`changes_since` lists ``(text, old, new)``
    after a given ``seq``: the ``mn_id`` before and after, None for absent
    (``old`` None: the address came into use; ``new`` None: it left use).
    """

    __slots__ = ("_base", "_log", "_map", "token")

    def __init__(self) -> None:
        self._map: dict[str, str] = {}
        self._log: list[tuple[str, str | None, str | None]] = []
        self._base = 0  # seq of _log[0]
        self.token = object()

    # ------------------------------------------------------------ Mapping

    def __getitem__(self, key: str) -> str:
        return self._map[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, key: object) -> bool:
        return key in self._map

    # The Mapping mixins would call __getitem__ once per key: the allocator's
    # rebuild at start walks 200,000 items at 100,000 live SAs (issue 9).
    def items(self) -> ItemsView[str, str]:
        return self._map.items()

    def keys(self) -> KeysView[str]:
        return self._map.keys()

    def values(self) -> ValuesView[str]:
        return self._map.values()

    def get(self, key: str, default: Any = None) -> Any:
        return self._map.get(key, default)

    def copy(self) -> dict[str, str]:
        return self._map.copy()

    # ------------------------------------------------------------ changes

    @property
    def seq(self) -> int:
        return self._base + len(self._log)

    def load(self, table: dict[str, str]) -> None:
        """Fill an empty table at once (a store building its view): no journal entries."""
        if self._map or self._log:
            raise ValueError("load: the table is not new")
        self._map = table

    def set(self, text: str, mn_id: str) -> None:
        old = self._map.get(text)
        if old == mn_id:
            return
        self._map[text] = mn_id
        self._record(text, old, mn_id)

    def delete(self, text: str) -> None:
        old = self._map.pop(text, None)
        if old is not None:
            self._record(text, old, None)

    def clear(self) -> None:
        """Every address leaves use at once.  Not journalled: ``seq`` jumps
        past the journal, so every reader sees None and rebuilds from the
        (empty) table -- cheaper than reading one removal per address."""
        self._map.clear()
        self._base = self.seq + 1
        self._log = []

    def _record(self, text: str, old: str | None, new: str | None) -> None:
        log = self._log
        log.append((text, old, new))
        # An eighth: ~9 B per live address at most, and a reader that fell
        # that far behind pays about as much to rebuild as to catch up.
        if len(log) > len(self._map) // 8 + _MARGIN:
            drop = len(log) // 2
            del log[:drop]
            self._base += drop

    def changes_since(self, seq: int) -> list[tuple[str, str | None, str | None]] | None:
        """The changes after ``seq`` in order, or None when they are no longer kept."""
        if seq < self._base or seq > self.seq:
            return None
        return self._log[seq - self._base :]
