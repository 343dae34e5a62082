"""Per-user sliding-window rate limit, in memory (one process serves all platforms)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable

__all__ = ["SlidingWindow"]


class SlidingWindow:
    """At most `limit` events per `window` seconds per key; refused attempts do not count."""

    def __init__(
        self, limit: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit, self.window, self.clock = limit, window, clock
        self._events: dict[Hashable, deque[float]] = {}

    def hit(self, key: Hashable) -> float:
        """Record an event for `key` if allowed: 0.0; otherwise the seconds until one is."""
        now = self.clock()
        events = self._events.setdefault(key, deque())
        while events and events[0] <= now - self.window:
            events.popleft()
        if len(events) >= self.limit:
            return max(0.0, events[0] + self.window - now)
        events.append(now)
        self._prune(now)
        return 0.0

    def forget(self, key: Hashable) -> None:
        self._events.pop(key, None)

    def _prune(self, now: float) -> None:
        """Drop idle keys now and then so memory stays bounded by active users."""
        if len(self._events) < 1024:
            return
        idle = [k for k, ev in self._events.items() if not ev or ev[-1] <= now - self.window]
        for key in idle:
            del self._events[key]
