"""Configuration of data preparation and batch loading (see data/prepare.py and data/loader.py)."""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from flowtrain._base import Section

BUILTIN_CORPORA = ("python-stdlib", "python-docs")


class DataConfig(Section):
    """Where the text comes from, how it is tokenized and split, and how batches are drawn."""

    sources: list[str] = Field(
        default_factory=lambda: ["python-stdlib", "python-docs"],
        description="built-in corpus names (python-stdlib, python-docs) and/or paths to files or directories",
    )
    dataset: str | None = Field(
        None, description="a prepared dataset directory (from `flowtrain prepare`); overrides `sources`"
    )
    text_field: str = Field("text", description="field holding the text in JSONL / Parquet / HF datasets")
    include: list[str] = Field(default_factory=list, description="glob patterns a directory's files must match")
    exclude: list[str] = Field(default_factory=list, description="glob patterns of files to skip")
    tokenizer: Literal["char", "byte", "bpe"] = "byte"
    tokenizer_path: str | None = Field(
        None,
        description="an existing tokenizer.json, or a transformers model directory holding one, to use instead "
        "of training one (model.init_from sets it to its source's)",
    )
    bpe_vocab_size: int = Field(8192, ge=260, le=1 << 20)
    bpe_train_bytes: int = Field(
        16_000_000,
        ge=0,
        description="BPE is trained on an evenly spread sample of about this many bytes of the corpus (all of it "
        "when smaller; 0: always all); the whole corpus is still encoded",
    )
    val_fraction: float = Field(0.1, gt=0, lt=1)
    split_by: Literal["auto", "document", "tokens"] = Field(
        "auto",
        description="document: whole documents go to val; tokens: the last fraction of the token stream "
        "(the classic single-file split); auto: document when the corpus has >= 10 documents",
    )
    splits: dict[Literal["train", "val"], str] = Field(
        default_factory=dict,
        description="a DatasetDict source (save_to_disk): which of its splits are train and val, when they are not "
        "called train and validation/valid/val/dev, e.g. {train: train_sft, val: test_sft} (data/hf_disk.py)",
    )
    split_seed: int = Field(0, description="seed of the document split (fixed, so every run sees the same val set)")
    token_dtype: Literal["auto", "uint16", "uint32"] = Field(
        "auto", description="dtype of the token files; auto: uint16 when the vocab fits, else uint32"
    )
    loader: Literal["random", "packed", "varlen"] = "random"
    doc_mask: bool = Field(False, description="packed loader: block-diagonal mask, no attention across documents")
    bucket_by_length: bool = Field(False, description="varlen loader: group documents of similar length")
    cache_dir: str | None = Field(
        None,
        description="where `train` keeps datasets it prepares itself (default: $FLOWTRAIN_CACHE or ~/.cache/flowtrain)",
    )

    @field_validator("sources", mode="before")
    @classmethod
    def _one_source_is_a_list_of_one(cls, sources):
        """`data.sources=path/to/file.txt` means the one source, as `[path/to/file.txt]` does."""
        return [sources] if isinstance(sources, str) else sources

    @model_validator(mode="after")
    def _has_input(self) -> "DataConfig":
        if not self.sources and not self.dataset:
            raise ValueError("no data: set data.sources (a path or python-stdlib/python-docs) or data.dataset")
        return self
