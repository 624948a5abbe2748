"""How much a trained run's samples look like the Python they were trained on, against the corpus itself.

    python benchmarks/sample_quality.py RUN_DIR [--samples 50] [--bytes 400] [--checkpoint latest]

Draws samples from RUN_DIR's model as the trainer's closing sample does (from a document start, temperature 0.8,
top-k 200; seeds 1..N) and as many excerpts of the same length from the run's validation split, starting at
line starts, then scores both on four line-level figures that a reader of code notices first:

- indent: non-blank lines indented by a multiple of four spaces;
- brackets: closing brackets that close the bracket opened last (across lines, as Python's tokenizer pairs them);
- keywords: lines whose first word is a Python keyword (def, return, if, import, ...);
- parses: non-blank lines that are a Python statement on their own (`ast.parse` of the dedented line, with
  `pass` after a trailing colon), the strictest: continuation lines of a long call or docstring prose fail it
  in the corpus too.

The corpus's own figures are the ceiling: a sample scoring near them reads, line by line, like the corpus.
"""

from __future__ import annotations

import argparse
import ast
import keyword
import random
import statistics
import sys
from pathlib import Path

import numpy as np

from flowtrain.data.dataset import TokenDataset
from flowtrain.data.prepare import dataset_for
from flowtrain.sample import generate
from flowtrain.train.load import load_trained

PAIRS = {")": "(", "]": "[", "}": "{"}


def indent_ok(lines: list[str]) -> float:
    return statistics.fmean((len(line) - len(line.lstrip(" "))) % 4 == 0 for line in lines)


def brackets_ok(text: str) -> float:
    """Share of closing brackets that match the last open one; quotes are not parsed (the same for both)."""
    stack, good, closing = [], 0, 0
    for ch in text:
        if ch in "([{":
            stack.append(ch)
        elif ch in PAIRS:
            closing += 1
            if stack and stack[-1] == PAIRS[ch]:
                stack.pop()
                good += 1
    return good / closing if closing else float("nan")


def keyword_lines(lines: list[str]) -> float:
    return statistics.fmean(keyword.iskeyword(line.split()[0].rstrip(":")) for line in lines)


def parses(line: str) -> bool:
    code = line.strip()
    if code.endswith(":"):
        code += " pass"
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def score(texts: list[str]) -> dict[str, float]:
    lines = [line for text in texts for line in text.split("\n")[1:-1] if line.strip()]  # whole lines only
    return {
        "lines": len(lines),
        "indent": indent_ok(lines),
        "brackets": statistics.fmean(b for b in (brackets_ok(t) for t in texts) if b == b),
        "keywords": keyword_lines(lines),
        "parses": statistics.fmean(parses(line) for line in lines),
    }


def corpus_excerpts(loaded, count: int, length: int) -> list[str]:
    """`count` excerpts of `length` tokens of the run's validation split, each starting after a newline."""
    val = TokenDataset.open(dataset_for(loaded.cfg.data, progress=False)).split("val")
    newline = loaded.tokenizer.encode("\n")[-1]
    rng = random.Random(0)
    starts = np.flatnonzero(val[: len(val) - length] == newline) + 1
    return [loaded.tokenizer.decode(val[s : s + length].tolist()) for s in rng.sample(list(starts), count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--bytes", type=int, default=400)
    parser.add_argument("--checkpoint", default="latest", help="latest, best, or a step number")
    args = parser.parse_args()
    loaded = load_trained(args.run, args.checkpoint)
    tok = loaded.tokenizer
    samples = [
        tok.decode(generate(loaded.model, [tok.eot_id], args.bytes, temperature=0.8, top_k=200, seed=seed, eos_id=None))
        for seed in range(1, args.samples + 1)
    ]
    corpus = corpus_excerpts(loaded, args.samples, args.bytes)
    print(f"{args.samples} texts of {args.bytes} tokens each; share of lines (brackets: of closing brackets)")
    print(f"{'':10}{'lines':>7}{'indent':>9}{'brackets':>10}{'keywords':>10}{'parses':>9}")
    for label, texts in (("samples", samples), ("corpus", corpus)):
        s = score(texts)
        print(
            f"{label:10}{s['lines']:>7}{s['indent']:>9.3f}{s['brackets']:>10.3f}{s['keywords']:>10.3f}{s['parses']:>9.3f}"
        )
    print("\nfirst sample:\n" + samples[0], file=sys.stderr)


if __name__ == "__main__":
    main()
