"""The run directory as its writer finds it: one writer at a time, what an interrupted run left cleaned up,
the checkpoint to continue from chosen (a fallback is announced), and the logs cut back to that checkpoint.

Why this is safe: the loop puts every log row up to a checkpoint's step on disk before the checkpoint appears
(train/run_log.py: sync), so the files always hold at least the history of the newest checkpoint, and a
continued run only has to drop what came after it (docs/run-dir.md: crash consistency).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flowtrain.errors import CheckpointError, ConfigError, FlowtrainError, RunDirError
from flowtrain.fsutil import DirectoryLock, Locked, fsync_dir
from flowtrain.rundir import LOCK_FILE, RunDir
from flowtrain.sinks.jsonl import JsonlSink
from flowtrain.train import checkpoint as ckpt
from flowtrain.train.distributed import DataParallel

# temporaries of fsutil's atomic writes (".NAME.RANDOM.tmp") of the files a run writes, the flow records'
# file in progress, and the checkpoint directories in progress (".step_N.tmp-RANDOM") or moved aside
# (".step_N.old-PID"), which a process killed in the middle leaves behind
_RUN_FILES = ("metrics.jsonl", "eval.jsonl", "alerts.jsonl", "config.yaml", "env.json", "summary.json")
_TEMP_FILE = re.compile(r"^\.(" + "|".join(re.escape(n) for n in _RUN_FILES) + r")\..+\.tmp$")
_TEMP_STEP = re.compile(r"^\.(step_\d+)\.(tmp-.+|old-\d+)$")
_ERRORS = {cls.__name__: cls for cls in (ConfigError, CheckpointError, RunDirError)}  # rank 0's, on every rank


def note(message: str) -> None:
    """A one-line notice on stderr: something the user should know, that does not stop the run."""
    print(f"flowtrain: note: {message}", file=sys.stderr, flush=True)


def lock(root: Path) -> DirectoryLock:
    """Take the run directory's lock (creating the directory), or a one-line error naming its holder."""
    try:
        return DirectoryLock.acquire(root, LOCK_FILE, create=True)
    except Locked as exc:
        raise RunDirError(
            f"run directory {root} is in use by another flowtrain process ({exc.holder}): one run directory takes "
            "one writer; wait for that process to end (or stop it with kill -TERM), then try again"
        ) from None
    except OSError as exc:
        raise RunDirError(
            f"cannot write in run directory {root} ({exc.strerror}); choose a writable train.out_dir"
        ) from None


def open_run_dir(
    parallel: DataParallel, run_dir: Path | None, resume_dir: Path | None
) -> tuple[RunDir, DirectoryLock | None, ckpt.Checkpoint | None]:
    """(run directory, rank 0's lock on it, checkpoint to resume from or None) for a new run (`run_dir`), a
    resumed one (`resume_dir`: a run directory or one of its checkpoints), or a resumed state written to a
    new directory (both: diagnose's scratch directory; the resumed run is only read).

    Rank 0, the only writer, locks the directory first: a second writer is refused, and what an interrupted
    run left behind is cleaned up before any rank reads a checkpoint from it. Every rank fails alike (no rank
    is left waiting in a collective), and only rank 0 announces anything."""
    continuing = resume_dir is not None and (run_dir is None or Path(run_dir) == run_of(resume_dir))
    root, held, failure = Path(run_dir) if run_dir is not None else run_of(resume_dir), None, None
    if parallel.is_main:
        try:
            if continuing and not root.is_dir():
                raise CheckpointError(f"cannot resume {resume_dir}: no such run directory")
            held = lock(root) if continuing else claim_fresh(root)
            if continuing:
                clean_interrupted(RunDir(root))
        except FlowtrainError as exc:
            failure = [type(exc).__name__, str(exc)]
    failure = parallel.broadcast_json(failure)
    if failure is not None:
        raise _ERRORS.get(failure[0], FlowtrainError)(failure[1])
    try:
        announce = note if parallel.is_main else _quiet
        resume_from = resume_point(Path(resume_dir), announce) if resume_dir is not None else None
    except BaseException:
        if held is not None:
            held.release()
        raise
    return RunDir(root), held, resume_from


def run_of(resume_dir: Path) -> Path:
    """The run directory of `--resume PATH` (a run directory, or one of its checkpoints)."""
    source = Path(resume_dir)
    return source.parent.parent if source.parent.name == "checkpoints" else source


def _quiet(message: str) -> None:
    """Ranks other than 0 announce nothing (rank 0 says it once)."""


def claim_fresh(root: Path) -> DirectoryLock:
    """Lock a new run's directory; it must hold nothing yet (or only the lock of an attempt that never started).

    Locking before looking makes two runs started with one name at once safe: one gets the directory, the
    other is refused (in use, or already exists)."""
    held = lock(root)
    leftovers = [p for p in Path(root).iterdir() if p.name != LOCK_FILE]
    if leftovers:
        held.release()
        newest = ckpt.latest_checkpoint(RunDir(Path(root)).checkpoints)
        how = (
            f"its newest checkpoint is {newest.name}: continue it with --resume {root}"
            if newest is not None
            else f"it has no checkpoint yet: --resume {root} starts it over from step 0"
        )
        raise ConfigError(f"run directory {root} already exists ({how}), or choose another train.run_name")
    return held


def abandon_fresh(root: Path, held: DirectoryLock) -> None:
    """A new run that failed before it wrote anything leaves no directory behind (only what it created)."""
    with contextlib.suppress(OSError):
        if [p.name for p in Path(root).iterdir()] == [LOCK_FILE]:
            (Path(root) / LOCK_FILE).unlink()
            if held.made_directory:
                Path(root).rmdir()
    held.release()


def clean_interrupted(run: RunDir, announce: Callable[[str], None] = note) -> None:
    """Remove what a process killed in the middle of a write left behind (the caller holds the lock, so no
    live writer owns any of it): temporary files quietly (a killed run always leaves flow.parquet's), an
    interrupted checkpoint with a notice. A checkpoint moved aside to be replaced goes back when its
    replacement never arrived."""
    for path in _children(run.root):
        if _TEMP_FILE.match(path.name) or path.name == run.flow.name + ".partial":
            path.unlink(missing_ok=True)
    removed = []
    for path in _children(run.checkpoints):
        m = _TEMP_STEP.match(path.name)
        if not m:
            continue
        final = run.checkpoints / m.group(1)
        if m.group(2).startswith("old-") and not final.exists():
            os.replace(path, final)  # killed between moving the old one aside and renaming the new one in
            fsync_dir(run.checkpoints)
            announce(f"put back checkpoint {final}, which an interrupted save had moved aside")
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    if removed:
        announce(
            f"removed the unfinished checkpoint(s) an interrupted run left in {run.checkpoints}: {', '.join(removed)}"
        )


def _children(directory: Path) -> list[Path]:
    return list(directory.iterdir()) if directory.is_dir() else []


def resume_point(path: Path, announce: Callable[[str], None] = note) -> ckpt.Checkpoint | None:
    """The checkpoint `--resume path` continues from: the one named, or the run's newest usable one (each newer
    one skipped is announced with its problem). None: the run has no checkpoint at all (it stopped before its
    first), so it starts over from step 0, which is announced too."""
    path = Path(path)
    if path.parent.name == "checkpoints":
        return ckpt.read_checkpoint(path)
    if not path.is_dir():
        raise CheckpointError(f"cannot resume {path}: no such run directory")
    found = ckpt.checkpoint_dirs(RunDir(path).checkpoints)
    if not found:
        announce(f"{path} has no checkpoint yet (it stopped before its first one): starting it over from step 0")
        return None
    problems = []
    for _, candidate in reversed(found):
        try:
            chosen = ckpt.read_checkpoint(candidate)
        except ckpt.UnusableCheckpoint as exc:
            problems.append(f"{candidate.name} {exc.problem}")
            continue
        if problems:
            announce(f"{'; '.join(problems)}: resuming from the newest usable checkpoint, {candidate.name}, instead")
        return chosen
    raise CheckpointError(
        f"cannot resume {path}: none of its checkpoints can be used ({'; '.join(problems)}); restore them "
        "from a copy, or start a new run"
    )


def cut_back(run: RunDir, step: int, *, final_eval_redone: bool, announce: Callable[[str], None] = note) -> None:
    """Make the run's files hold the history up to `step` only, the state a continued run starts from: later
    metrics, evaluation and alert rows go (and the evaluation of the whole split at `step` when the run
    makes it again), unreadable lines go with a notice, flow.parquet keeps its rows up to `step` (an
    unreadable one is kept aside, announced), and summary.json goes (the run is unfinished again)."""

    def full_eval_at_step(record: dict) -> bool:
        return final_eval_redone and record.get("step") == step and any(k.endswith("_full") for k in record)

    for path in (run.metrics, run.evals, run.alerts):
        unreadable = JsonlSink.truncate_after(path, step, full_eval_at_step if path == run.evals else None)
        if unreadable:
            announce(f"{path}: dropped {unreadable} unreadable line(s) (not UTF-8 JSON: damaged or edited)")
    _cut_back_flow(run.flow, step, announce)
    run.summary.unlink(missing_ok=True)


def _cut_back_flow(path: Path, step: int, announce: Callable[[str], None]) -> None:
    """flow.parquet up to `step`; the writer carries these rows over (flow/records.py: keep_before_step)."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    try:
        pq.ParquetFile(path).read(columns=["step"])  # the footer and every row group's step column
    except (OSError, pa.ArrowInvalid) as exc:
        aside = path.with_name(path.name + ".unreadable")
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()
        os.replace(path, aside)
        announce(
            f"{path} cannot be read ({str(exc).splitlines()[0][:120]}): kept as {aside.name}; the run writes a "
            f"new flow.parquet from step {step + 1} on"
        )
