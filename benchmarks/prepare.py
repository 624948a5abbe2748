"""Benchmark of the data pipeline (issue 3).

1. Prepare `python-stdlib` with a trained byte-level BPE (default 8192 tokens): train the tokenizer, encode,
   write. Prints wall time, MB/s, tokens/s and peak RSS (target: <= 30 s, <= 2 GB on a 2-core machine).
2. Preparing is flat in corpus size: a generated corpus of N and 4N MB (one text file, and JSONL with a
   document a line), prepared with the char and the BPE tokenizer; peak RSS of 4N must be within 100 MB of N's.
3. Memory flat in corpus size: the training-side reader (BatchLoader random windows + periodic
   eval_batches) and then a real `Trainer.run_loop()` (the default model, microscope and guard on) run over a
   ~2 MB and a ~2 GB token file; peak RSS must differ by <= 100 MB. Each measurement runs in its own process.

    python benchmarks/prepare.py [--vocab 8192] [--flat-mb 16] [--big-mb 2048] [--steps 2000] [--workdir DIR]
        [--only prepare|flat|rss]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

PREPARE_CHILD = """
import json, resource, time
from flowtrain.data.config import DataConfig
from flowtrain.data.corpora import Corpus
from flowtrain.data.dataset import TokenDataset
from flowtrain.data.prepare import prepare_dataset
cfg = DataConfig(sources=["python-stdlib"], tokenizer="bpe", bpe_vocab_size={vocab})
size = Corpus(cfg.sources).size_bytes()
start = time.perf_counter()
path = prepare_dataset(cfg, {out!r}, progress=False)
wall = time.perf_counter() - start
ds = TokenDataset.open(path)
tokens = sum(ds.n_tokens(s) for s in ("train", "val"))
print(json.dumps({{"wall_s": wall, "bytes": size, "tokens": tokens,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

READER_CHILD = """
import json, resource
from flowtrain.data.dataset import TokenDataset
from flowtrain.data.loader import BatchLoader, eval_batches
ds = TokenDataset.open({path!r})
loader = BatchLoader(ds, "train", batch_size=12, block_size=64, mode="random", seed=0)
for step in range({steps}):
    batch = loader.next()
    if step % 250 == 0:
        for _ in eval_batches(ds, "train", 12, 64, 20):
            pass
print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "train_tokens": ds.n_tokens("train")}}))
"""

FLAT_CHILD = """
import json, resource, time
from flowtrain.data.config import DataConfig
from flowtrain.data.prepare import prepare_dataset
cfg = DataConfig(sources=[{src!r}], tokenizer={tok!r}, bpe_vocab_size={vocab})
start = time.perf_counter()
prepare_dataset(cfg, {out!r}, progress=False)
print(json.dumps({{"wall_s": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

TRAIN_CHILD = """
import json, resource, tempfile
from flowtrain.config import load_config
from flowtrain.train.runtime import tune_cpu_allocator
from flowtrain.train.trainer import Trainer
tune_cpu_allocator()  # as `flowtrain train` does on the CPU
with tempfile.TemporaryDirectory() as out:
    cfg = load_config("default", ["data.dataset={path}", "train.max_steps={steps}", "schedule.warmup_steps=10",
                                  "train.eval_interval=100", "train.checkpoint_interval={steps}",
                                  "train.sample_tokens=0", "train.out_dir=" + out, "train.run_name=rss",
                                  "log.console=false", "log.tensorboard=false"])
    Trainer(cfg).run_loop()
print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def _child(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _generated_corpus(path: Path, mb: int, kind: str) -> Path:
    """`mb` MB of English-like text (Zipf-distributed words from a fixed made-up vocabulary, lines of ~12 words,
    documents of ~10 kB): one text file (kind "text") or JSONL with a document a line (kind "jsonl")."""
    rng = np.random.default_rng(0)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(1, 10))) for _ in range(20_000)]
    weights = 1 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()
    with open(path, "w", encoding="utf-8") as out:
        written = 0
        while written < mb << 20:
            words = rng.choice(len(vocab), size=1600, p=weights)
            lines = [" ".join(vocab[i] for i in words[j : j + 12]) for j in range(0, len(words), 12)]
            doc = "\n".join(lines) + "\n"
            out.write(json.dumps({"text": doc}) + "\n" if kind == "jsonl" else doc)
            written += len(doc)
    return path


def _flat(work: Path, mb: int, vocab: int) -> None:
    """Peak RSS preparing generated corpora of `mb` and 4 x `mb` MB, per corpus shape and tokenizer."""
    for kind in ("text", "jsonl"):
        corpora = {size: _generated_corpus(work / f"gen{size}.{kind}", size, kind) for size in (mb, 4 * mb)}
        for tok in ("char", "bpe"):
            rss = {}
            for size, src in corpora.items():
                out = work / f"flat-{kind}-{tok}-{size}"
                r = _child(FLAT_CHILD.format(src=str(src), tok=tok, vocab=vocab, out=str(out)))
                shutil.rmtree(out)
                rss[size] = r["peak_rss_mb"]
                print(
                    f"prepare a {size} MB {kind} corpus, {tok}: peak RSS {r['peak_rss_mb']:.0f} MB, "
                    f"{r['wall_s']:.1f} s ({size / r['wall_s']:.2f} MB/s)"
                )
            delta = rss[4 * mb] - rss[mb]
            print(f"  {kind}, {tok}: {4 * mb} vs {mb} MB {delta:+.0f} MB [target <= 100 MB: "
                  f"{'PASS' if delta <= 100 else 'FAIL'}]")  # fmt: skip
        for src in corpora.values():
            src.unlink()


def _tiled_dataset(src: Path, out: Path, n_tokens: int) -> Path:
    """A dataset whose train split is `src`'s train tokens repeated to n_tokens (documents repeated too)."""
    out.mkdir(parents=True)
    meta = json.loads((src / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    base = np.memmap(src / "train.bin", dtype=dtype, mode="r")
    base_docs = np.load(src / "train_docs.npy", allow_pickle=False)
    written, docs = 0, []
    with open(out / "train.bin", "wb") as f:
        while written < n_tokens:
            take = min(len(base), n_tokens - written)
            f.write(np.asarray(base[:take]).tobytes())
            docs.append(base_docs[base_docs < take] + written)
            written += take
    np.save(out / "train_docs.npy", np.concatenate(docs).astype(np.int64))
    for name in ("val.bin", "val_docs.npy", "tokenizer.json"):
        shutil.copy(src / name, out / name)
    scale = n_tokens / meta["splits"]["train"]["tokens"]
    meta["splits"]["train"] = {
        "tokens": n_tokens,
        "documents": int(sum(len(d) for d in docs)),
        "bytes": int(meta["splits"]["train"]["bytes"] * scale),
    }
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--big-mb", type=int, default=2048, help="size of the large token file")
    parser.add_argument("--steps", type=int, default=2000, help="loader batches per RSS measurement")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed)")
    parser.add_argument("--flat-mb", type=int, default=16, help="size N of the generated corpora (N and 4N MB)")
    parser.add_argument(
        "--only", choices=["prepare", "flat", "rss"], help="one part (rss also runs prepare, whose dataset it tiles)"
    )
    parser.add_argument("--train-steps", type=int, default=300, help="steps of the real training run per file")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="flowtrain-bench-"))
    try:
        if args.only in (None, "flat"):
            _flat(work, args.flat_mb, args.vocab)
        if args.only == "flat":
            return
        r = _child(PREPARE_CHILD.format(vocab=args.vocab, out=str(work / "bpe")))
        mb = r["bytes"] / 1e6
        print(
            f"prepare python-stdlib, BPE {args.vocab}: {r['wall_s']:.1f} s wall, {mb:.1f} MB, "
            f"{mb / r['wall_s']:.2f} MB/s, {r['tokens'] / r['wall_s']:,.0f} tokens/s, "
            f"peak RSS {r['peak_rss_mb']:.0f} MB  [target <= 30 s, <= 2048 MB: "
            f"{'PASS' if r['wall_s'] <= 30 and r['peak_rss_mb'] <= 2048 else 'FAIL'}]"
        )
        if args.only == "prepare":
            return
        itemsize = np.dtype(json.loads((work / "bpe" / "meta.json").read_text())["dtype"]).itemsize
        small = _tiled_dataset(work / "bpe", work / "small", (2 << 20) // itemsize)
        big = _tiled_dataset(work / "bpe", work / "big", (args.big_mb << 20) // itemsize)
        rss = {}
        for label, path in (("small", small), ("big", big)):
            rss[label] = _child(READER_CHILD.format(path=str(path), steps=args.steps))
            size_mb = (path / "train.bin").stat().st_size / 2**20
            print(f"reader over a {size_mb:,.0f} MB token file: peak RSS {rss[label]['peak_rss_mb']:.0f} MB")
        delta = rss["big"]["peak_rss_mb"] - rss["small"]["peak_rss_mb"]
        print(f"peak RSS difference {delta:+.0f} MB [target <= 100 MB: {'PASS' if delta <= 100 else 'FAIL'}]")
        # the whole training process (model, optimizer, microscope, guard, evaluation, checkpoint) on both files
        train = {
            label: _child(TRAIN_CHILD.format(path=str(path), steps=args.train_steps))
            for label, path in (("small", small), ("big", big))
        }
        for label in ("small", "big"):
            print(
                f"training {args.train_steps} steps on the {label} file: peak RSS {train[label]['peak_rss_mb']:.0f} MB"
            )
        delta = train["big"]["peak_rss_mb"] - train["small"]["peak_rss_mb"]
        print(f"training peak RSS difference {delta:+.0f} MB [target <= 100 MB: {'PASS' if delta <= 100 else 'FAIL'}]")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
