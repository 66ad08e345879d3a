"""Which entries a cache keeps: the text-only policies (dense, window, StreamingLLM sink).

A policy sees the list of *entries* the cache would hold after the current forward (absolute story
positions, in cache order: what was held plus the new tokens) and returns the indices of the entries
to keep, or None to keep them all. `PolicyCache` applies that plan to every layer after the step.
"""

from __future__ import annotations

from typing import Sequence


class Policy:
    """Base class: keep everything (the name, flags and bound are overridden by subclasses)."""

    name = "dense"
    rerotates = False  # keys re-assigned to slots 0..n-1 (StreamingLLM pos shift)
    needs_token_ids = False  # must be told the token ids of each forward (`PolicyCache.observe`)

    @property
    def max_entries(self) -> int | None:
        """Most entries held between steps; None when the cache can grow without bound."""
        return None

    def observe(self, token_ids: Sequence[int], start: int) -> None:
        """Learn the ids of the tokens about to be fed, at absolute positions start, start+1, ..."""

    def reset(self) -> None:
        """Forget the story (called by `PolicyCache.reset`); stateless policies have nothing to forget."""

    def select(self, entries: list[int]) -> list[int] | None:
        """Indices of `entries` to keep after this step, in cache order; None keeps all."""
        return None


class DensePolicy(Policy):
    """Everything, at absolute positions: the reference that must equal `DynamicCache`."""


class WindowPolicy(Policy):
    """The last `window` tokens (window attention; collapses once the first tokens leave, per attention_sinks)."""

    name = "window"
    rerotates = True

    def __init__(self, window: int):
        self.window = window

    @property
    def max_entries(self) -> int:
        return self.window

    def select(self, entries: list[int]) -> list[int] | None:
        n = len(entries)
        return None if n <= self.window else list(range(n - self.window, n))


class SinkPolicy(Policy):
    """StreamingLLM: the first `sink` tokens plus the last `window` (the window counted apart from the sink)."""

    name = "sink"
    rerotates = True

    def __init__(self, sink: int, window: int):
        self.sink, self.window = sink, window

    @property
    def max_entries(self) -> int:
        return self.sink + self.window

    def select(self, entries: list[int]) -> list[int] | None:
        n = len(entries)
        if n <= self.sink + self.window:
            return None
        return list(range(self.sink)) + list(range(n - self.window, n))
