"""Bad inputs, tried for real: every trial runs the `flowtrain` command (or torchrun) as a fresh process on real
damaged files, and must end as issue 21 asks: exit 2 with exactly one line `flowtrain: error: ...` naming the
problem and no traceback, or, where the input is not an error (a damaged log line in a report, a diverged run,
a run shorter than its warmup), exit 0 with a notice. Prints one line per trial and the count.

    python benchmarks/bad_inputs.py [--keep DIR]

Trials that need a small or read-only filesystem mount a tmpfs, which needs root; elsewhere they are skipped
and counted as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.conftest: the corpus the suite uses
from tests.conftest import write_corpus  # noqa: E402

TINY = ["data.sources=[small.txt]", "data.tokenizer=char", "data.cache_dir=cache", "model.n_layer=1",
        "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.batch_size=2", "train.max_steps=4",
        "train.eval_interval=2", "train.eval_batches=1", "train.checkpoint_interval=2", "train.sample_tokens=0",
        "log.console=false", "log.tensorboard=false"]  # fmt: skip


@dataclass
class Trial:
    name: str
    argv: list[str]  # after `flowtrain` (or a full torchrun command when argv[0] == "torchrun")
    expect: str  # a fragment of the error line, or of stderr when ok
    ok: bool = False  # exit 0 with a notice instead of an error
    setup: Callable[[Path], None] | None = None
    root: bool = False  # needs mount (a tmpfs)


def _cli(workdir: Path, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if argv[0] == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    else:
        cmd = [sys.executable, "-m", "flowtrain", *argv]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env, timeout=600)


def _mount_tmpfs(path: Path, size: str, read_only: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


def _rehash(checkpoint: Path, name: str) -> None:
    """Update meta.json's checksum of `name`, as someone who tampers on purpose would."""
    import hashlib

    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["sha256"][name] = hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def _copy_run(w: Path, name: str, src: str = "base") -> Path:
    shutil.copytree(w / "runs" / src, w / "runs" / name)
    return w / "runs" / name


def _damaged_config(content: bytes | Callable[[bytes], bytes]) -> Callable[[Path, str], None]:
    def setup(w: Path, name: str) -> None:
        cfg = _copy_run(w, name) / "config.yaml"
        cfg.write_bytes(content(cfg.read_bytes()) if callable(content) else content)

    return setup


def trials() -> list[Trial]:
    t: list[Trial] = []
    add = t.append
    # ---- item 4: checked before step 1
    add(Trial("lr infinite", ["train", *TINY, "optim.lr=.inf"], "'optim.lr' (got inf): Input should be a finite"))
    add(Trial("lr NaN", ["train", *TINY, "optim.lr=.nan"], "'optim.lr' (got nan)"))
    add(Trial("beta NaN", ["train", *TINY, "optim.betas=[0.9,.nan]"], "'optim.betas.1' (got nan)"))
    add(
        Trial("NaN in a -c file", ["train", "-c", "nan.yaml", *TINY], "config nan.yaml: invalid config value for 'clip")
    )
    add(Trial("stop-after 0", ["train", *TINY, "train.run_name=s0", "--stop-after", "0"], "--stop-after 0: give"))
    add(Trial("stop-after -1", ["train", *TINY, "train.run_name=s1", "--stop-after", "-1"], "--stop-after -1"))
    add(Trial("stop-after before the resumed step", ["train", "--resume", "runs/base", "--stop-after", "2"],
              "already at step 4"))  # fmt: skip
    add(Trial("block longer than val", ["train", *TINY, "model.block_size=6000"], "longer than the val split"))
    add(Trial("block longer than val, varlen", ["train", *TINY, "model.block_size=6000", "data.loader=varlen"],
              "longer than the val split"))  # fmt: skip
    add(Trial("block longer than train", ["train", *TINY, "model.block_size=60000"], "longer than the train split"))
    add(Trial("out_dir is a file", ["train", *TINY, "train.out_dir=afile"], "afile is a file"))
    add(Trial("out_dir under a file", ["train", *TINY, "train.out_dir=afile/runs"], "afile is a file"))
    add(Trial("out_dir read-only", ["train", *TINY, "train.out_dir=ro/runs"], "cannot write to", root=True,
              setup=lambda w: _mount_tmpfs(w / "ro", "64k", read_only=True)))  # fmt: skip
    add(
        Trial(
            "out_dir on a 1 MB disk",
            ["train", *TINY, "model.n_embd=128", "train.out_dir=tiny/runs"],
            "not enough free disk for a checkpoint",
            root=True,
            setup=lambda w: _mount_tmpfs(w / "tiny", "1m"),
        )
    )
    add(Trial("a 3.7 TB checkpoint", ["train", *TINY, "model.n_layer=24", "model.n_embd=32768", "model.n_head=64"],
              "one needs about"))  # fmt: skip
    add(Trial("run name with a path", ["train", *TINY, "train.run_name=../../x"], "not a plain directory name"))
    add(
        Trial(
            "grad_accum 3 on 2 ranks",
            [
                "torchrun",
                "--standalone",
                "--nproc_per_node",
                "2",
                "-m",
                "flowtrain",
                "train",
                *TINY,
                "train.grad_accum=3",
                "train.run_name=ga3",
            ],
            "do not divide each other",
        )
    )
    add(
        Trial(
            "batch 3 shared by 2 ranks",
            [
                "torchrun",
                "--standalone",
                "--nproc_per_node",
                "2",
                "-m",
                "flowtrain",
                "train",
                *TINY,
                "train.batch_size=3",
                "train.run_name=b3",
            ],
            "train.batch_size=3 cannot be split",
        )
    )
    # ---- item 5: one line instead of a traceback
    bad_yaml = b"model: [unclosed\n  n_layer: 2\n"
    for cmd in ("resume", "diagnose", "report"):
        argv = {"resume": ["train", "--resume"], "diagnose": ["diagnose"], "report": ["report"]}[cmd]
        add(Trial(f"invalid YAML in config.yaml ({cmd})", [*argv, f"runs/yaml-{cmd}"], "is not valid YAML",
                  setup=lambda w, c=cmd: _damaged_config(bad_yaml)(w, f"yaml-{c}")))  # fmt: skip
    add(Trial("config.yaml cut mid-key (resume)", ["train", "--resume", "runs/cut"], "config.yaml is not valid YAML",
              setup=lambda w: _damaged_config(lambda b: b[: b.index(b"n_head") + 3])(w, "cut")))  # fmt: skip
    add(Trial("config.yaml cut at a line end (resume)", ["train", "--resume", "runs/cutline"], "is incomplete (no ",
              setup=lambda w: _damaged_config(lambda b: b[: b.index(b"\ntrain:") + 1])(w, "cutline")))  # fmt: skip
    add(Trial("config.yaml not UTF-8 (resume)", ["train", "--resume", "runs/bin"], "is not UTF-8 text",
              setup=lambda w: _damaged_config(lambda b: b"\xff\xfe" + b)(w, "bin")))  # fmt: skip
    add(Trial("config.yaml not UTF-8 (report)", ["report", "runs/binr"], "config.yaml is not UTF-8 text",
              setup=lambda w: _damaged_config(lambda b: b"\xff\xfe" + b)(w, "binr")))  # fmt: skip
    add(
        Trial(
            "checkpoint config.yaml edited (sample)",
            ["sample", "runs/ckcfg"],
            "checksum mismatch",
            setup=lambda w: (_copy_run(w, "ckcfg") / "checkpoints/step_000004/config.yaml").write_text("model: ["),
        )
    )
    add(Trial("invalid YAML in -c", ["train", "-c", "broken.yaml"], "broken.yaml is not valid YAML"))
    add(Trial("-c file not UTF-8", ["train", "-c", "binary.yaml"], "binary.yaml is not UTF-8 text (byte 1); save"))
    add(Trial("-c file cut mid-key", ["train", "-c", "cut.yaml"], "cut.yaml is not valid YAML"))
    add(Trial("binary dataset tokenizer.json", ["train", *TINY, "data.dataset=ds-bin"], "not UTF-8 text",
              setup=lambda w: _dataset(w, "ds-bin", b"\x89PNG\r\n\x1a\n\x00\xff")))  # fmt: skip
    add(Trial("garbage dataset tokenizer.json", ["train", *TINY, "data.dataset=ds-junk"], "does not parse as JSON",
              setup=lambda w: _dataset(w, "ds-junk", b"{junk")))  # fmt: skip
    add(
        Trial(
            "damaged DCP shard, checksum matching (resume)",
            ["train", "--resume", "runs/dcp1", "train.max_steps=6"],
            "the sharded state cannot be read",
            setup=lambda w: _damage_shard(w, "dcp1"),
        )
    )
    add(Trial("planted pickle in the DCP index (sample)", ["sample", "runs/dcp2"], "refusing to load it",
              setup=lambda w: _plant_index(w, "dcp2")))  # fmt: skip
    add(
        Trial(
            "prepare onto a full disk",
            ["prepare", "big.txt", "--tokenizer", "char", "-o", "full/ds"],
            "no space left preparing the dataset",
            root=True,
            setup=lambda w: _mount_tmpfs(w / "full", "256k"),
        )
    )
    add(
        Trial(
            "train preparing onto a full disk",
            ["train", *TINY, "data.sources=[big.txt]", "data.cache_dir=full2"],
            "no space left preparing the dataset",
            root=True,
            setup=lambda w: _mount_tmpfs(w / "full2", "256k"),
        )
    )
    add(Trial("prepare into a read-only place", ["prepare", "small.txt", "-o", "ro2/ds"], "cannot write the dataset",
              root=True, setup=lambda w: _mount_tmpfs(w / "ro2", "64k", read_only=True)))  # fmt: skip
    add(Trial("sample a diverged run", ["sample", "runs/nan"], "logits are not finite"))
    add(Trial("truncated flow.parquet (report)", ["report", "runs/pq"], "not a readable flow.parquet",
              setup=lambda w: _truncate(_copy_run(w, "pq") / "flow.parquet")))  # fmt: skip
    # ---- not errors: handled with a notice
    add(
        Trial(
            "metrics.jsonl not UTF-8 (report)",
            ["report", "runs/mj"],
            "skipped 1 damaged line(s)",
            ok=True,
            setup=lambda w: _insert_line(_copy_run(w, "mj") / "metrics.jsonl", b"\xff\xfe\x00{\n"),
        )
    )
    add(
        Trial(
            "alerts.jsonl not UTF-8 (report)",
            ["report", "runs/aj"],
            "skipped 1 damaged line(s)",
            ok=True,
            setup=lambda w: _insert_line(_copy_run(w, "aj") / "alerts.jsonl", b"\x80garbage\n"),
        )
    )
    add(
        Trial(
            "a diverged run (lr 1e30, guard off)",
            ["train", *TINY, "optim.lr=1e30", "guard.enabled=false", "train.sample_tokens=20", "train.run_name=nan2"],
            "no closing sample",
            ok=True,
        )
    )
    add(Trial("a run shorter than its warmup", ["train", *TINY, "train.max_steps=50", "train.run_name=w50"],
              "warming up for 5 steps", ok=True))  # fmt: skip
    return t


def _dataset(w: Path, name: str, tokenizer: bytes) -> None:
    _cli(w, ["prepare", "small.txt", "--tokenizer", "char", "-o", name])
    (w / name / "tokenizer.json").write_bytes(tokenizer)


def _damage_shard(w: Path, name: str) -> None:
    run = _copy_run(w, name, "sharded")
    c = run / "checkpoints" / "step_000004"
    shard = next((c / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 3 // 4])
    _rehash(c, f"dcp/{shard.name}")


def _plant_index(w: Path, name: str) -> None:
    run = _copy_run(w, name, "sharded")
    c = run / "checkpoints" / "step_000004"
    (c / "dcp" / ".metadata").write_bytes(b"cos\nsystem\n(S'echo pwned > /tmp/flowtrain-pwned'\ntR.")
    _rehash(c, "dcp/.metadata")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _insert_line(path: Path, line: bytes) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1] + [line] + lines[1:]))


def prepare_workdir(w: Path) -> None:
    write_corpus(w / "small.txt")
    write_corpus(w / "big.txt", 120_000)
    (w / "afile").write_text("not a directory\n")
    (w / "nan.yaml").write_text("clip:\n  max_norm: .nan\n")
    (w / "broken.yaml").write_text("model: {n_layer: 2\n")
    (w / "binary.yaml").write_bytes(b"\x00\xff\xfe\x89binary")
    (w / "cut.yaml").write_text("model:\n  n_layer: 2\n  n_he")
    for name, extra in (("base", []), ("sharded", ["train.checkpoint_format=sharded"])):
        done = _cli(w, ["train", *TINY, f"train.run_name={name}", *extra])
        assert done.returncode == 0, done.stderr
    done = _cli(w, ["train", *TINY, "optim.lr=1e30", "guard.enabled=false", "train.run_name=nan"])
    assert done.returncode == 0, done.stderr


def judge(trial: Trial, done: subprocess.CompletedProcess) -> str | None:
    """None when the trial ended cleanly, else what was wrong."""
    if trial.argv[0] == "torchrun":  # every rank says it once; torchrun then reports its failed children
        tracebacks = done.stderr.split("Traceback (most recent call last):")[1:]
        if any("torch/distributed/run.py" not in block for block in tracebacks):
            return "traceback in a rank"  # only torchrun's own ChildFailedError report may have one
        mine = [line for line in done.stderr.splitlines() if line.startswith("flowtrain: error: ")]
        ok = "exitcode  : 2" in done.stderr and mine and all(trial.expect in line for line in mine)
        return None if ok else f"exit {done.returncode}"
    if "Traceback" in done.stderr:
        return "traceback"
    if trial.ok:
        return None if done.returncode == 0 and trial.expect in done.stderr else f"exit {done.returncode}"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("flowtrain: error: ")]
    if done.returncode != 2 or len(errors) != 1 or lines[-1] != errors[0]:
        return f"exit {done.returncode}, {len(errors)} error line(s)"
    return None if trial.expect in errors[0] else f"unexpected message: {errors[0]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="flowtrain-bad-inputs-"))
    work.mkdir(parents=True, exist_ok=True)
    can_mount = os.geteuid() == 0 and _mount_tmpfs(work / ".probe", "64k")
    if can_mount:
        subprocess.run(["umount", str(work / ".probe")], check=True)
    prepare_workdir(work)
    clean = failed = skipped = 0
    mounts = []
    try:
        for trial in trials():
            if trial.root and not can_mount:
                skipped += 1
                print(f"skip  {trial.name} (needs root to mount a tmpfs)")
                continue
            if trial.setup is not None:
                trial.setup(work)
            mounts += [p for p in work.iterdir() if os.path.ismount(p) and p not in mounts]
            why = judge(trial, done := _cli(work, trial.argv))
            line = (done.stderr.strip().splitlines() or [""])[-1]
            if why is None:
                clean += 1
                print(f"clean {trial.name}: {line[:150]}")
            else:
                failed += 1
                print(f"FAIL  {trial.name}: {why}\n{done.stderr[-3000:]}")
    finally:
        for path in mounts:
            subprocess.run(["umount", str(path)], capture_output=True)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{clean + failed} bad inputs tried: {clean} clean, {failed} not; {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
