import json

import numpy as np
import pytest
import torch

from flowtrain.data.loader import IGNORE_INDEX, BatchLoader, eval_batches
from flowtrain.errors import DataError

from .conftest import make_docs, prepare


def _text(ds, ids) -> str:
    return ds.tokenizer.decode([int(i) for i in ids])


def _segments(ds, row_tokens, row_ids) -> list[str]:
    """Split one packed row into its per-document pieces (by doc id) and decode them."""
    cuts = np.flatnonzero(np.diff(row_ids)) + 1
    return [_text(ds, piece) for piece in np.split(row_tokens, cuts)]


def _same(a, b) -> bool:
    same_docs = (a.doc_ids is None and b.doc_ids is None) or torch.equal(a.doc_ids, b.doc_ids)
    return torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and same_docs


def test_random_windows_are_contiguous_and_counter_based(byte_ds):
    data = np.asarray(byte_ds.split("train")).astype(np.int64)
    loader = BatchLoader(byte_ds, "train", batch_size=5, block_size=16, mode="random", seed=3)
    batches = [loader.next() for _ in range(3)]
    for k, b in enumerate(batches):
        assert b.inputs.shape == b.targets.shape == (5, 16) and b.inputs.dtype == torch.int64
        assert b.n_targets == 80 and b.doc_ids is None
        offsets = np.random.default_rng([3, 0, k]).integers(0, len(data) - 16, size=5)
        for row, o in enumerate(offsets):
            assert b.inputs[row].tolist() == data[o : o + 16].tolist()
            assert b.targets[row].tolist() == data[o + 1 : o + 17].tolist()
    again = BatchLoader(byte_ds, "train", batch_size=5, block_size=16, mode="random", seed=3)
    assert all(_same(b, again.next()) for b in batches)
    other_rank = BatchLoader(byte_ds, "train", 5, 16, "random", seed=3, rank=1, world_size=2)
    assert not torch.equal(other_rank.next().inputs, batches[0].inputs)


def test_random_doc_ids_follow_document_starts(byte_ds):
    loader = BatchLoader(byte_ds, "train", 4, 64, "random", seed=0, doc_mask=True)
    b = loader.next()
    eot = byte_ds.tokenizer.eot_id
    for row in range(4):
        ids, toks = b.doc_ids[row].tolist(), b.inputs[row].tolist()
        for t in range(1, 64):  # the id steps up exactly after an EOT
            assert ids[t] - ids[t - 1] == (1 if toks[t - 1] == eot else 0)


@pytest.mark.parametrize(
    "mode, kw",
    [("random", {}), ("packed", {"doc_mask": True}), ("varlen", {}), ("varlen", {"bucket_by_length": True})],
)
def test_resume_gives_exactly_the_uninterrupted_batches(byte_ds, mode, kw):
    def make():
        return BatchLoader(byte_ds, "train", batch_size=3, block_size=24, mode=mode, seed=7, **kw)

    straight = make()
    expected = [straight.next() for _ in range(150)]  # crosses epochs and bucketing pools
    for stop in (1, 37, 96, 149):
        first = make()
        for _ in range(stop):
            first.next()
        state = json.loads(json.dumps(first.state_dict()))
        assert len(json.dumps(state)) < 400
        resumed = make()
        resumed.load_state_dict(state)
        for k in range(stop, 150):
            assert _same(resumed.next(), expected[k]), (stop, k)


def test_state_from_another_configuration_is_refused(byte_ds):
    state = BatchLoader(byte_ds, "train", 3, 24, "random", seed=7).state_dict()
    with pytest.raises(DataError, match="batch_size: saved 3 vs now 4"):
        BatchLoader(byte_ds, "train", 4, 24, "random", seed=7).load_state_dict(state)


def test_context_longer_than_split_is_a_data_error(tmp_path):
    (tmp_path / "t.txt").write_text("short text")
    ds = prepare(tmp_path, [tmp_path / "t.txt"])
    with pytest.raises(DataError, match="block_size=64 is longer than the val split"):
        BatchLoader(ds, "val", 2, 64)
    with pytest.raises(DataError, match="longer than the train split"):
        list(eval_batches(ds, "train", 2, 64, 1))


def test_packed_rows_are_bos_aligned_and_cover_each_document_once(byte_ds):
    train_docs = len(byte_ds.documents("train")[0])
    loader = BatchLoader(byte_ds, "train", batch_size=4, block_size=32, mode="packed", seed=1, doc_mask=True)
    started: list[str] = []  # document headers in the order documents start ("?" when cut inside the header)
    while len(started) < 2 * train_docs:
        b = loader.next()
        assert b.n_targets == 4 * 32 and b.doc_ids.shape == (4, 32)
        for row in range(4):
            tokens = torch.cat([b.inputs[row], b.targets[row, -1:]]).numpy()
            ids = np.append(b.doc_ids[row].numpy(), b.doc_ids[row, -1].item())
            pieces = _segments(byte_ds, tokens, ids)
            # later pieces start at a document start (the last may be cut inside the "doc NNN:" header)
            assert all("doc ".startswith(p[:4]) for p in pieces[1:])
            started += [p[:8] if len(p) >= 8 else "?" for p in pieces if "doc ".startswith(p[:4])]
    for epoch in range(2):  # each epoch starts every document exactly once
        names = started[epoch * train_docs : (epoch + 1) * train_docs]
        full = [n for n in names if n != "?"]
        assert len(set(full)) == len(full) and len(full) >= 0.6 * train_docs


def test_varlen_rows_are_whole_documents_padded_and_masked(byte_ds):
    docs = set(make_docs())
    n_train = len(byte_ds.documents("train")[0])
    loader = BatchLoader(byte_ds, "train", batch_size=4, block_size=512, mode="varlen", seed=2)
    seen = []
    pad = byte_ds.tokenizer.pad_id
    while len(seen) < n_train:
        b = loader.next()
        real = b.targets != IGNORE_INDEX
        assert b.n_targets == int(real.sum())
        for row in range(b.inputs.shape[0]):
            n = int(real[row].sum())
            assert real[row, :n].all() and not real[row, n:].any()  # padding only at the end
            assert (b.inputs[row, n:] == pad).all()
            assert b.targets[row, n - 1].item() == byte_ds.tokenizer.eot_id
            seen.append(_text(byte_ds, b.inputs[row, :n]) + _text(byte_ds, b.targets[row, n - 1 : n]))
        assert b.inputs.shape[1] == int(real.sum(1).max())  # padded to the batch's longest row
    assert len(set(seen[:n_train])) == n_train and set(seen) <= docs


def test_varlen_splits_long_documents_without_losing_targets(byte_ds):
    data = np.asarray(byte_ds.split("train"))
    starts, lengths = byte_ds.documents("train")
    loader = BatchLoader(byte_ds, "train", batch_size=1, block_size=8, mode="varlen", seed=0)
    doc = loader._cursor.order()[0]
    first = int(starts[doc])
    got = []
    while len(got) < lengths[doc] - 1:
        targets = loader.next().targets[0]
        got += targets[targets != IGNORE_INDEX].tolist()
    assert got == data[first + 1 : first + lengths[doc]].tolist()


def test_bucketing_groups_similar_lengths(byte_ds):
    plain = BatchLoader(byte_ds, "train", 4, 512, "varlen", seed=5)
    bucketed = BatchLoader(byte_ds, "train", 4, 512, "varlen", seed=5, bucket_by_length=True)
    plain_pad = sum(b.inputs.numel() - b.n_targets for b in (plain.next() for _ in range(32)))
    bucketed_pad = sum(b.inputs.numel() - b.n_targets for b in (bucketed.next() for _ in range(32)))
    assert bucketed_pad < plain_pad / 2


def test_ranks_get_disjoint_documents(byte_ds):
    n_train = len(byte_ds.documents("train")[0])
    rows = []
    for rank in range(2):
        loader = BatchLoader(byte_ds, "train", 1, 512, "varlen", seed=0, rank=rank, world_size=2)
        rows.append({_text(byte_ds, loader.next().inputs[0]) for _ in range(n_train // 2)})
    assert not rows[0] & rows[1] and len(rows[0] | rows[1]) == 2 * (n_train // 2)


def test_eval_batches_fixed_subset_and_whole_split(byte_ds):
    first = list(eval_batches(byte_ds, "val", 3, 16, 4))
    second = list(eval_batches(byte_ds, "val", 3, 16, 4))
    assert len(first) == 4 and all(_same(a, b) for a, b in zip(first, second, strict=True))
    data = np.asarray(byte_ds.split("val")).astype(np.int64)
    whole = list(eval_batches(byte_ds, "val", 3, 16, None))
    targets = torch.cat([b.targets.reshape(-1) for b in whole])
    inputs = torch.cat([b.inputs.reshape(-1) for b in whole])
    real = targets != IGNORE_INDEX
    assert targets[real].tolist() == data[1:].tolist()  # every token after the first predicted once, in order
    assert inputs[real].tolist() == data[:-1].tolist()
    assert sum(b.n_targets for b in whole) == len(data) - 1


def test_splits_are_memory_mapped(byte_ds):
    assert isinstance(byte_ds.split("train"), np.memmap) and isinstance(byte_ds.split("val"), np.memmap)
