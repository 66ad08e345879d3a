"""`RaggedCache`: one forward for a batch of stories whose caches hold different entries (issue 13).

A `PolicyCache` serves one story, or a batch whose rows hold the same entries. The stories of a long-story cell
part ways at once: greedy captions have different lengths, so the rows hold different numbers of entries, and
the image-boundary policies evict different ones. A `RaggedCache` keeps each story's own `PolicyCache` and runs
them as one batch, which costs about as much as one story at this model size (a forward of the tiny model is
mostly fixed overhead):

- a forward feeds q_i new tokens to row i (the inputs are padded at the end to the longest q);
- at every layer each row's cache takes its own q_i keys and values, applies its own policy, and returns its
  n_i + q_i entries; they are left-padded to a common length and stacked;
- `inputs` gives the position ids each row's cache expects (n_i .. n_i + q_i - 1, as a lone story would get
  them) and the 4D mask: row i's queries see only row i's entries, causally.

Every row then computes what it would alone, up to float rounding (the batched matrix products add in another
order). Padded query slots attend to their row's entries (a row of -inf would give NaN); their outputs are
ignored and their keys never stored. `rows` picks the stories of the next forward, so a caption loop can go on
with the stories that are still writing.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from transformers.cache_utils import Cache

from labkit.caches.policy_cache import PolicyCache


class RaggedCache(Cache):
    """A batch of per-story `PolicyCache`s; `rows` (set by `inputs`) are the stories of the next forward."""

    def __init__(self, caches: Sequence[PolicyCache]):
        super().__init__(layers=list(caches[0].layers))  # only counted by transformers; rows hold the tensors
        self.caches = list(caches)
        self.rows: list[int] = list(range(len(self.caches)))
        self._lengths: list[int] = []  # q_i of the next forward, per row of `rows`
        self._positions: torch.Tensor | None = None

    def inputs(self, rows: Sequence[int], ids: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepare a forward feeding `ids[k]` to story `rows[k]`: each cache observes its ids; returns the
        position ids [B, q] and the boolean attention mask [B, 1, q, L] to pass to the model."""
        if len(rows) != len(ids) or not rows:
            raise ValueError(f"one id list per row: {len(rows)} rows, {len(ids)} id lists")
        self.rows, self._lengths = list(rows), [len(row_ids) for row_ids in ids]
        held = [self.caches[r].get_seq_length() for r in self.rows]
        width = max(self._lengths)
        total = max(n + q for n, q in zip(held, self._lengths))
        positions = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), 1, width, total), dtype=torch.bool, device=device)
        for k, (r, n, q) in enumerate(zip(self.rows, held, self._lengths)):
            self.caches[r].observe(list(ids[k]))
            positions[k] = torch.arange(n, n + width, device=device)
            start = total - n - q  # the row's entries are left-padded: they end where every row ends
            mask[k, 0, :, start:] = True  # padded query slots see the row's entries (never an empty row)
            mask[k, 0, :q, start + n :] = torch.ones((q, q), dtype=torch.bool, device=device).tril()
        self._positions = positions
        return positions, mask

    @contextlib.contextmanager
    def lookahead(self) -> Iterator["RaggedCache"]:
        """Every story's look-ahead at once (see `PolicyCache.lookahead`)."""
        with contextlib.ExitStack() as stack:
            for cache in self.caches:
                stack.enter_context(cache.lookahead())
            yield self

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        rows = []
        for k, (r, q) in enumerate(zip(self.rows, self._lengths)):
            row_kwargs = {"position_ids": self._positions[k : k + 1, :q]}
            rows.append(
                self.caches[r].update(
                    key_states[k : k + 1, :, :q], value_states[k : k + 1, :, :q], layer_idx, kwargs=row_kwargs
                )
            )
        total = max(row_keys.shape[-2] for row_keys, _ in rows)
        keys = key_states.new_zeros((len(rows), key_states.shape[1], total, key_states.shape[-1]))
        values = value_states.new_zeros((len(rows), value_states.shape[1], total, value_states.shape[-1]))
        for k, (row_keys, row_values) in enumerate(rows):  # left padding, as `inputs` assumes
            keys[k, :, total - row_keys.shape[-2] :] = row_keys[0]
            values[k, :, total - row_values.shape[-2] :] = row_values[0]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.caches[r].get_seq_length(layer_idx) for r in self.rows)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        raise RuntimeError("a RaggedCache needs the 4D mask of RaggedCache.inputs(); pass it as attention_mask")

    def reset(self) -> None:
        for cache in self.caches:
            cache.reset()
