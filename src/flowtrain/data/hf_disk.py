"""A Hugging Face dataset saved with `save_to_disk`, read with pyarrow only (no `datasets` needed to read it).

A `Dataset` is a directory with state.json listing its Arrow files: its documents go through the configured
train/val split like any other source's. A `DatasetDict` (dataset_dict.json and one directory per split) keeps
the splits it was made with: its train split is train and its validation split ("validation", "valid", "val" or
"dev") is val, so a benchmark's fixed validation set stays what it is. Without a validation split, val is drawn
from its train split as configured. flowtrain has no test split: "test" and any other split are not used, and
the prepare line names them. `data.splits` maps other names, e.g. `data.splits={train: train_sft, val: test_sft}`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from flowtrain.data.corpora import FileListSource
from flowtrain.data.readers import Piece, arrow_documents
from flowtrain.errors import DataError

VAL_NAMES = ("validation", "valid", "val", "dev")  # what a DatasetDict's validation split is called, in practice


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is unreadable ({exc}); re-save the dataset with save_to_disk") from None


def _arrow_files(root: Path) -> list[str]:
    """The Arrow files of one saved Dataset (a directory with state.json), in its order."""
    state = _read_json(root / "state.json")
    names = [entry["filename"] for entry in state.get("_data_files", []) if "filename" in entry]
    if not names:
        raise DataError(f"{root}/state.json lists no data files; re-save the dataset with save_to_disk")
    return names


def plan_splits(root: Path, names: list[str], mapping: dict[str, str]) -> dict:
    """Which of a DatasetDict's splits (`names`) become train and val (`mapping`: data.splits), and which are not
    used; a mapping to a missing split, or no train split, is a DataError naming the splits there are."""
    listed = ", ".join(names)
    for ours, theirs in mapping.items():
        if theirs not in names:
            raise DataError(
                f"data.splits.{ours}={theirs!r}, but {root} has the splits {listed}; map train and val to two of them"
            )
    train = mapping.get("train", "train" if "train" in names else None)
    if train is None:
        raise DataError(
            f"{root} is a DatasetDict with the splits {listed} and none is called train; say which to use, e.g. "
            f"data.splits={{train: {names[0]}, val: {names[-1]}}}"
        )
    val = mapping.get("val", next((n for n in VAL_NAMES if n in names and n != train), None))
    if val == train:
        raise DataError(f"data.splits maps both train and val to {root}'s split {train!r}; give val another split")
    return {"train": train, "val": val, "unused": [n for n in names if n not in (train, val)]}


class HFDiskSource(FileListSource):
    """A directory written by `datasets.Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""

    kind = "hf-disk"

    def __init__(self, root: Path, text_field: str, splits: dict[str, str]) -> None:
        self.is_dict = (root / "dataset_dict.json").is_file()
        self.plan: dict | None = None
        self.split_of: dict[Path, str | None] = {}  # file -> the flowtrain split its documents go to
        if self.is_dict:
            names = _read_json(root / "dataset_dict.json").get("splits", [])
            self.plan = plan_splits(root, list(names), dict(splits))
            own_val = self.plan["val"] is not None  # else val is drawn from train like any source's
            for ours in ("train", "val"):
                theirs = self.plan[ours]
                if theirs is not None:
                    for name in _arrow_files(root / theirs):
                        self.split_of[root / theirs / name] = ours if own_val else None
        else:
            self.split_of = {root / name: None for name in _arrow_files(root)}
        super().__init__(str(root), root, list(self.split_of))
        self.text_field = text_field

    @staticmethod
    def looks_like(root: Path) -> bool:
        return (root / "state.json").is_file() or (root / "dataset_dict.json").is_file()

    def split_plan(self) -> dict:
        """The DatasetDict's splits as prepare uses them: {"train": name, "val": name or None, "unused": [...]}."""
        return dict(self.plan or {})

    def identity(self) -> dict:
        return {**super().identity(), "text_field": self.text_field, "splits": self.plan}

    def pieces(self, skipped: Counter, hasher) -> Iterator[Piece]:
        for path, split in self.split_of.items():
            if not path.is_file():
                raise DataError(f"{path} is missing from the saved dataset; re-save it with save_to_disk")
            yield from arrow_documents(path, self.text_field, hasher, skipped, split)
