"""Datasets saved by the `datasets` library (data/hf_disk.py): a DatasetDict keeps its own train/val splits."""

import numpy as np
import pytest

from flowtrain.data.config import DataConfig
from flowtrain.data.prepare import cache_key, prepare_dataset
from flowtrain.errors import DataError

from .conftest import make_docs, prepare

datasets = pytest.importorskip("datasets", reason="the dev extras install datasets (pip install -e '.[dev]')")


def _save(root, splits: dict[str, list[str]]):
    """A real DatasetDict (or a Dataset, for one unnamed split) written by `save_to_disk`."""
    if list(splits) == [None]:
        datasets.Dataset.from_dict({"text": splits[None]}).save_to_disk(str(root))
    else:
        parts = {name: datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))})
                 for name, texts in splits.items()}  # fmt: skip
        datasets.DatasetDict(parts).save_to_disk(str(root))
    return root


def _texts(ds, split: str) -> list[str]:
    starts, lengths = ds.documents(split)
    data = np.asarray(ds.split(split))
    return [bytes(data[s : s + n - 1].astype(np.uint8)).decode() for s, n in zip(starts, lengths, strict=True)]


DOCS = make_docs(30)
TRAIN, VAL, TEST = DOCS[:20], DOCS[20:25], DOCS[25:]


@pytest.mark.parametrize("val_name", ["validation", "valid", "val", "dev"])
def test_a_dataset_dict_keeps_its_own_splits(tmp_path, capsys, val_name):
    root = _save(tmp_path / "dd", {"train": TRAIN, val_name: VAL, "test": TEST})
    ds = prepare(tmp_path, [root], tokenizer="byte")
    assert _texts(ds, "train") == TRAIN and _texts(ds, "val") == VAL  # in order, not re-drawn; test not used
    split = ds.meta["split"]
    assert split["split_by"] == "source"
    assert split["from_sources"] == {str(root): {"train": "train", "val": val_name, "unused": ["test"]}}
    assert ds.meta["splits"]["val"]["bytes"] == sum(len(t.encode()) for t in VAL)
    prepare_dataset(DataConfig(sources=[str(root)], tokenizer="byte"), tmp_path / "again")
    assert f"train = its 'train', val = its '{val_name}', not used: test" in capsys.readouterr().err


def test_only_a_train_split_is_split_as_configured(tmp_path):
    dd = prepare(tmp_path, [_save(tmp_path / "dd", {"train": DOCS})], name="from_dd", tokenizer="byte")
    plain = prepare(tmp_path, [_save(tmp_path / "plain", {None: DOCS})], name="from_plain", tokenizer="byte")
    assert dd.meta["split"]["split_by"] == plain.meta["split"]["split_by"] == "document"
    for split in ("train", "val"):  # the same seeded choice of documents a plain Dataset gets
        assert _texts(dd, split) == _texts(plain, split)
    assert len(_texts(dd, "val")) == round(len(DOCS) * 0.1)


def test_other_split_names_are_mapped_or_refused_in_one_line(tmp_path):
    root = _save(tmp_path / "dd", {"train_sft": TRAIN, "test_sft": VAL})
    with pytest.raises(DataError, match=r"splits train_sft, test_sft and none is called train; .*data\.splits="):
        prepare(tmp_path, [root])
    ds = prepare(tmp_path, [root], tokenizer="byte", splits={"train": "train_sft", "val": "test_sft"})
    assert _texts(ds, "train") == TRAIN and _texts(ds, "val") == VAL
    with pytest.raises(DataError, match=r"data\.splits\.val='dev', but .* has the splits train_sft, test_sft"):
        prepare(tmp_path, [root], name="x", splits={"train": "train_sft", "val": "dev"})
    with pytest.raises(DataError, match="both train and val"):
        prepare(tmp_path, [root], name="y", splits={"train": "train_sft", "val": "train_sft"})
    with pytest.raises(DataError, match="no source is a DatasetDict"):
        prepare(tmp_path, [_save(tmp_path / "plain", {None: DOCS})], name="z", splits={"val": "test"})


def test_the_cache_key_follows_the_split_mapping(tmp_path):
    root = _save(tmp_path / "dd", {"train": TRAIN, "validation": VAL, "test": TEST})
    keys = {
        cache_key(DataConfig(sources=[str(root)], splits=mapping))
        for mapping in ({}, {"val": "validation"}, {"val": "test"})
    }
    assert len(keys) == 2  # the default mapping is the explicit one; another val split is another dataset


def test_fixed_splits_beside_other_sources(tmp_path, docs_dir):
    root = _save(tmp_path / "dd", {"train": TRAIN, "validation": VAL})
    ds = prepare(tmp_path, [root, docs_dir], tokenizer="byte")
    train, val = _texts(ds, "train"), _texts(ds, "val")
    assert train[: len(TRAIN)] == TRAIN and set(VAL) <= set(val)
    assert len(val) - len(VAL) == round(40 * 0.1)  # the directory's documents split as configured
    assert ds.meta["split"]["split_by"] == "document"
    with pytest.raises(DataError, match="split_by=tokens cuts one token stream"):
        prepare(tmp_path, [root, docs_dir], name="tok", split_by="tokens")
