"""The least-recently-used cache of the project, within a budget, with the counters its stage exports as metrics.

One implementation for the caches: prompt embeddings (``text_encoder``), hint-embedding files, hint tensors and
resident ControlNets (``controlnet``), converted LoRAs (``lora_manager``). The budget is in the units of
``size(value)``: bytes, or entries with ``size=lambda v: 1`` (``budget_bytes`` = the capacity). Keys must name
everything the value depends on; a value is put only after it was computed in full, so a failed request leaves
nothing behind.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass
class LRUStats:
    """Cumulative counters (metrics report what they grew by since the last report)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    #: The sum of ``size`` over the entries kept now (bytes; entries for a count budget).
    bytes_resident: int = 0
    #: Caches that load a value on a miss (ControlNets, LoRAs) count the loads that succeeded and their seconds.
    loads: int = 0
    load_seconds: float = 0.0


@dataclass
class ByteLRU(Generic[V]):
    """``budget_bytes`` = 0 disables the cache (every lookup misses, nothing is kept), unless ``keep_newest``.

    ``size(value)`` gives an entry's bytes (or 1, for a budget that counts entries); ``on_evict(value)`` runs when an
    entry leaves (eviction, replacement, :meth:`pop`, :meth:`clear`). An entry larger than the whole budget is not
    kept, unless ``keep_newest``: then the entry just put always stays (everything older is evicted while over the
    budget), for caches whose newest entry is in use by the caller (converted LoRAs).
    """

    budget_bytes: int
    size: Callable[[V], int]
    on_evict: Callable[[V], None] | None = None
    stats: LRUStats = field(default_factory=LRUStats)
    keep_newest: bool = False

    def __post_init__(self) -> None:
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is kept; counts nothing and leaves the order as it is."""
        return key in self._entries

    def items(self) -> list[tuple[Hashable, V]]:
        """``(key, value)`` of every entry kept now, least recently used first (a copy); counts nothing."""
        with self._lock:
            return [(key, value) for key, (value, _) in self._entries.items()]

    def get(self, key: Hashable, valid: Callable[[V], bool] | None = None) -> V | None:
        """The value for ``key`` (now the most recently used), or ``None``; counts a hit or a miss.

        ``valid(value)`` False (e.g. the source changed, or the value's file is gone) is a miss: the entry stays where
        it is until a :meth:`put` for its key replaces it (or it is evicted).
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or (valid is not None and not valid(entry[0])):
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry[0]

    def put(self, key: Hashable, value: V) -> None:
        """Keep ``value`` under ``key`` (the most recently used), evicting the least recently used beyond the budget."""
        nbytes = self.size(value)
        with self._lock:
            self.pop(key)
            if nbytes > self.budget_bytes and not self.keep_newest:
                if self.on_evict is not None:
                    self.on_evict(value)
                return
            self._entries[key] = (value, nbytes)
            self.stats.bytes_resident += nbytes
            while self.stats.bytes_resident > self.budget_bytes and len(self._entries) > 1:  # (never the newest)
                self._drop(next(iter(self._entries)))
                self.stats.evictions += 1

    def pop(self, key: Hashable) -> None:
        """Forget ``key`` if present (its ``on_evict`` runs; not counted as an eviction)."""
        with self._lock:
            if key in self._entries:
                self._drop(key)

    def clear(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._drop(key)

    def _drop(self, key: Hashable) -> None:
        value, nbytes = self._entries.pop(key)
        self.stats.bytes_resident -= nbytes
        if self.on_evict is not None:
            self.on_evict(value)
