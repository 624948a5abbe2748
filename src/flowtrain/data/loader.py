"""Batches from a TokenDataset: random windows, packed documents, or variable-length documents.

Every mode is resumable exactly: `state_dict()` is a few integers of JSON and, after `load_state_dict`, the
next batch is the one an uninterrupted loader would have produced.

* random — windows of block_size+1 tokens at random offsets. Batch k of rank r is drawn from a generator
  seeded by (seed, rank, k): counter-based, so the state is just k and ranks draw independent streams.
* packed — sequential epochs over shuffled documents, BOS-aligned: a row begins at a document start (or
  continues a document too long for one row); further documents are appended while they fit; a short
  document that does not fit is cropped and its tail dropped (a long one continues in the next row), so rows
  rarely start mid-document. `doc_mask=True` adds doc_ids for the block-diagonal attention mask.
* varlen — one document per row (documents longer than block_size+1 are split into pieces), padded per batch
  to the longest row with the pad id; padded targets are -100 so the loss averages over real tokens only.
  `bucket_by_length` sorts a pool of rows by length before batching, so batches waste less padding.

Document modes deal this rank's documents as perm[rank::world_size] of the epoch's permutation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from flowtrain.data.dataset import TokenDataset
from flowtrain.errors import DataError

IGNORE_INDEX = -100
STATE_VERSION = 1
_BUCKET_POOL = 32  # batches per length-sorting pool in varlen mode


@dataclass
class Batch:
    inputs: torch.Tensor  # int64 [B, T]
    targets: torch.Tensor  # int64 [B, T], IGNORE_INDEX where there is nothing to predict
    doc_ids: torch.Tensor | None  # int64 [B, T]: equal ids may attend to each other (block-diagonal mask)
    n_targets: int  # targets != IGNORE_INDEX (what the loss averages over)

    def rows(self, which: slice) -> Batch:
        """Some of the rows (ranks that share a micro-batch each take a slice of it)."""
        targets = self.targets[which]
        doc_ids = None if self.doc_ids is None else self.doc_ids[which]
        return Batch(self.inputs[which], targets, doc_ids, int((targets != IGNORE_INDEX).sum()))


def _make_batch(inputs: np.ndarray, targets: np.ndarray, doc_ids: np.ndarray | None) -> Batch:
    return Batch(
        inputs=torch.from_numpy(inputs.astype(np.int64)),
        targets=torch.from_numpy(targets.astype(np.int64)),
        doc_ids=None if doc_ids is None else torch.from_numpy(doc_ids.astype(np.int64)),
        n_targets=int((targets != IGNORE_INDEX).sum()),
    )


class _DocCursor:
    """Position (epoch, index into this rank's documents, offset inside the document) in document order."""

    def __init__(self, starts: np.ndarray, lengths: np.ndarray, seed: int, rank: int, world_size: int) -> None:
        self.starts, self.lengths = starts, lengths
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = self.index = self.offset = 0
        self._order_epoch = -1
        self._order = np.zeros(0, dtype=np.int64)

    def order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            perm = np.random.default_rng([self.seed, 1, self.epoch]).permutation(len(self.starts))
            self._order, self._order_epoch = perm[self.rank :: self.world_size], self.epoch
        return self._order

    def current(self) -> tuple[int, int, int]:
        """(doc number, absolute start of the unread part, tokens left in it), rolling over epochs."""
        if self.index >= len(self.order()):
            self.epoch, self.index, self.offset = self.epoch + 1, 0, 0
        doc = int(self.order()[self.index])
        return doc, int(self.starts[doc]) + self.offset, int(self.lengths[doc]) - self.offset

    def advance(self, taken: int, row_len: int, continue_doc: bool) -> None:
        """After taking `taken` tokens of the current document: continue it (with one token of overlap, so
        no target is lost) or move on to the next document."""
        if continue_doc:
            self.offset += taken - 1
        else:
            self.index, self.offset = self.index + 1, 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "offset": self.offset}

    def load(self, state: dict) -> None:
        self.epoch, self.index, self.offset = int(state["epoch"]), int(state["index"]), int(state["offset"])


class BatchLoader:
    """`next()` → Batch; see the module docstring for the modes."""

    def __init__(
        self,
        dataset: TokenDataset,
        split: str,
        batch_size: int,
        block_size: int,
        mode: str = "random",
        seed: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
        doc_mask: bool = False,
        bucket_by_length: bool = False,
    ) -> None:
        if mode not in ("random", "packed", "varlen"):
            raise DataError(f"unknown loader mode {mode!r}; use random, packed or varlen")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.dataset = dataset
        self.data = dataset.split(split)  # replaced by a fresh memmap for every batch (see next())
        self.split, self.batch_size, self.block_size = split, batch_size, block_size
        self.mode, self.seed, self.rank, self.world_size = mode, seed, rank, world_size
        self.doc_mask, self.bucket_by_length = doc_mask, bucket_by_length
        self.pad_id = dataset.tokenizer.pad_id if dataset.tokenizer.pad_id is not None else dataset.tokenizer.eot_id
        n = len(self.data)
        if mode != "varlen" and n < block_size + 1:
            raise DataError(
                f"context block_size={block_size} is longer than the {split} split ({n} tokens); "
                "lower model.block_size or add more text"
            )
        self.starts, self.lengths = dataset.documents(split)
        if mode != "random" and len(self.starts) < world_size:
            raise DataError(
                f"the {split} split has {len(self.starts)} documents, fewer than the {world_size} ranks; "
                "add documents or use loader mode random"
            )
        self.step = 0
        self._cursor = _DocCursor(self.starts, self.lengths, seed, rank, world_size)
        self._pending: list[Batch] = []  # varlen: the rest of the current length-sorted pool
        self._pool_state: dict | None = None
        self._pool_taken = 0

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next()

    def next(self) -> Batch:
        self.data = self.dataset.fresh_view(self.split)
        if self.mode == "random":
            batch = self._random_batch(self.step)
        elif self.mode == "packed":
            batch = self._packed_batch()
        else:
            batch = self._varlen_batch()
        self.step += 1
        return batch

    # -- random ---------------------------------------------------------------------------------------------
    def _random_batch(self, k: int) -> Batch:
        rng = np.random.default_rng([self.seed, self.rank, k])
        offsets = rng.integers(0, len(self.data) - self.block_size, size=self.batch_size)
        windows = self.data[offsets[:, None] + np.arange(self.block_size + 1)]
        doc_ids = None
        if self.doc_mask:
            positions = offsets[:, None] + np.arange(self.block_size)
            doc_ids = np.searchsorted(self.starts, positions, side="right") - 1
        return _make_batch(windows[:, :-1], windows[:, 1:], doc_ids)

    # -- packed ---------------------------------------------------------------------------------------------
    def _packed_row(self) -> tuple[np.ndarray, np.ndarray]:
        row_len = self.block_size + 1
        pieces, ids = [], []
        filled = 0
        while filled < row_len:
            _, start, left = self._cursor.current()
            space = row_len - filled
            if left <= space:
                take, carry_on = left, False
            else:
                # at a row start, or a document longer than a row: continue it next row; else crop it.
                take, carry_on = space, filled == 0 or left > row_len
            pieces.append(np.asarray(self.data[start : start + take]))
            ids.append(np.full(take, len(ids)))
            self._cursor.advance(take, row_len, carry_on)
            filled += take
        return np.concatenate(pieces), np.concatenate(ids)

    def _packed_batch(self) -> Batch:
        rows, ids = zip(*(self._packed_row() for _ in range(self.batch_size)), strict=True)
        rows, ids = np.stack(rows), np.stack(ids)
        return _make_batch(rows[:, :-1], rows[:, 1:], ids[:, :-1] if self.doc_mask else None)

    # -- varlen ---------------------------------------------------------------------------------------------
    def _varlen_row(self) -> np.ndarray:
        row_len = self.block_size + 1
        while True:
            _, start, left = self._cursor.current()
            take = min(left, row_len)
            self._cursor.advance(take, row_len, left > row_len)
            if take >= 2:  # a one-token piece has nothing to predict
                return np.asarray(self.data[start : start + take])

    def _pad(self, rows: list[np.ndarray]) -> Batch:
        width = max(len(r) for r in rows) - 1
        inputs = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        doc_ids = np.ones((len(rows), width), dtype=np.int64)  # padding gets its own id: attends to nothing real
        for i, r in enumerate(rows):
            inputs[i, : len(r) - 1] = r[:-1]
            targets[i, : len(r) - 1] = r[1:]
            doc_ids[i, : len(r) - 1] = 0
        return _make_batch(inputs, targets, doc_ids if self.doc_mask else None)

    def _varlen_batch(self) -> Batch:
        if not self.bucket_by_length:
            return self._pad([self._varlen_row() for _ in range(self.batch_size)])
        if not self._pending:
            self._pool_state, self._pool_taken = self._cursor.state(), 0
            self._pending = self._build_pool()
        self._pool_taken += 1
        return self._pending.pop(0)

    def _build_pool(self) -> list[Batch]:
        pool_epoch = self._cursor.epoch
        rows = [self._varlen_row() for _ in range(self.batch_size * _BUCKET_POOL)]
        rows.sort(key=len)
        batches = [self._pad(rows[i : i + self.batch_size]) for i in range(0, len(rows), self.batch_size)]
        order = np.random.default_rng([self.seed, 2, self.rank, pool_epoch, self._pool_state["index"]]).permutation(
            len(batches)
        )
        return [batches[i] for i in order]

    # -- state ----------------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        return {
            "mode": self.mode,
            "split": self.split,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "bucket_by_length": self.bucket_by_length,
        }

    def state_dict(self) -> dict:
        """Tiny JSON-able state: the batch counter and, for document modes, the document cursor."""
        state = {"version": STATE_VERSION, **self._identity(), "step": self.step, "cursor": self._cursor.state()}
        if self._pending:  # mid-pool: replay the pool from where it started
            state["cursor"] = self._pool_state
            state["pool_taken"] = self._pool_taken
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state has version {state.get('version')}, expected {STATE_VERSION}; restart")
        mismatched = [k for k, v in self._identity().items() if state.get(k) != v]
        if mismatched:
            diffs = ", ".join(f"{k}: saved {state.get(k)!r} vs now {getattr(self, k)!r}" for k in mismatched)
            raise DataError(f"loader state does not fit this loader ({diffs}); resume with the same settings")
        self.step = int(state["step"])
        self._cursor.load(state["cursor"])
        self._pending = []
        if "pool_taken" in state:
            self.data = self.dataset.fresh_view(self.split)
            self._pool_state, self._pool_taken = dict(state["cursor"]), int(state["pool_taken"])
            self._pending = self._build_pool()[self._pool_taken :]


def eval_batches(
    dataset: TokenDataset, split: str, batch_size: int, block_size: int, n_batches: int | None
) -> Iterator[Batch]:
    """A fixed evaluation set: n_batches*batch_size windows evenly spaced over the split (the same every call),
    or, when n_batches is None, the whole split in order with every token after the first predicted once
    (the last window is padded with targets -100)."""
    data = dataset.split(split)
    n = len(data)
    if n < block_size + 1:
        raise DataError(
            f"context block_size={block_size} is longer than the {split} split ({n} tokens); "
            "lower model.block_size or add more text"
        )
    if n_batches is not None:
        offsets = np.linspace(0, n - block_size - 1, n_batches * batch_size).round().astype(np.int64)
        for b in range(n_batches):
            chunk = offsets[b * batch_size : (b + 1) * batch_size]
            windows = dataset.fresh_view(split)[chunk[:, None] + np.arange(block_size + 1)]
            yield _make_batch(windows[:, :-1], windows[:, 1:], None)
        return
    pad = dataset.tokenizer.pad_id if dataset.tokenizer.pad_id is not None else dataset.tokenizer.eot_id
    n_windows = -(-(n - 1) // block_size)  # windows start at 0, T, 2T, ... while a target remains
    for first in range(0, n_windows, batch_size):
        data = dataset.fresh_view(split)
        starts = np.arange(first, min(first + batch_size, n_windows), dtype=np.int64) * block_size
        positions = starts[:, None] + np.arange(block_size + 1)
        window = np.asarray(data[np.minimum(positions, n - 1)]).astype(np.int64)
        beyond = positions >= n  # only the split's last window runs past its end
        inputs = np.where(beyond[:, :-1], pad, window[:, :-1])
        targets = np.where(beyond[:, 1:], IGNORE_INDEX, window[:, 1:])
        yield _make_batch(inputs, targets, None)
