"""A least-recently-used cache within a byte budget, with the counters its stage exports as metrics.

Used for the cross-request caches: prompt embeddings (``text_encoder``) and hint embeddings (``controlnet``). Keys
must name everything the value depends on; a value is put only after it was computed in full, so a failed
request leaves nothing behind.
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
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_resident: int = 0


@dataclass
class ByteLRU(Generic[V]):
    """``budget_bytes`` = 0 disables the cache (every lookup misses, nothing is kept).

    ``size(value)`` gives an entry's bytes; ``on_evict(value)`` runs when an entry leaves (eviction, replacement,
    :meth:`clear`). An entry larger than the whole budget is not kept.
    """

    budget_bytes: int
    size: Callable[[V], int]
    on_evict: Callable[[V], None] | None = None
    stats: LRUStats = field(default_factory=LRUStats)

    def __post_init__(self) -> None:
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> V | None:
        """The value for ``key`` (now the most recently used), or ``None``; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry[0]

    def put(self, key: Hashable, value: V) -> None:
        """Keep ``value`` under ``key``, evicting the least recently used entries beyond the budget."""
        nbytes = self.size(value)
        with self._lock:
            self.pop(key)
            if nbytes > self.budget_bytes:
                if self.on_evict is not None:
                    self.on_evict(value)
                return
            self._entries[key] = (value, nbytes)
            self.stats.bytes_resident += nbytes
            while self.stats.bytes_resident > self.budget_bytes:
                self._drop(next(iter(self._entries)))
                self.stats.evictions += 1

    def pop(self, key: Hashable) -> None:
        """Forget ``key`` if present (its ``on_evict`` runs)."""
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
