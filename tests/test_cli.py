"""The `flowtrain` command through real subprocesses: the happy path and every bad input of issue 2."""

import json
import os
import platform
import subprocess
import sys

import pytest

from tests.conftest import tiny_overrides


def run_cli(*args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "flowtrain", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    # progress output may precede it, but the error itself is exactly one line, and the last one
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("flowtrain: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_help_for_every_subcommand():
    for sub in ("prepare", "train", "sample"):
        proc = run_cli(sub, "--help")
        assert proc.returncode == 0 and "usage: flowtrain" in proc.stdout


def test_prepare_train_sample(small_text, tmp_path):
    data = tmp_path / "ds"
    proc = run_cli("prepare", small_text, "--tokenizer", "char", "-o", data, "data.split_by=tokens")
    assert proc.returncode == 0, proc.stderr
    assert (data / "meta.json").is_file() and (data / "tokenizer.json").is_file()

    overrides = tiny_overrides(small_text, tmp_path, **{"data.dataset": data})
    proc = run_cli("train", *overrides)
    assert proc.returncode == 0, proc.stderr
    assert "sample:" in proc.stdout
    run_dir = tmp_path / "runs" / "tiny"
    if platform.libc_ver()[0] == "glibc":  # the command tunes the process (train.tune_allocator), not the Trainer
        env = json.loads((run_dir / "env.json").read_text())
        assert env["cpu_allocator"].startswith("glibc malloc: mmap threshold"), env["cpu_allocator"]

    a = run_cli("sample", run_dir, "--prompt", "ROMEO:", "--max-new-tokens", 40, "--seed", 3)
    b = run_cli("sample", run_dir, "--prompt", "ROMEO:", "--max-new-tokens", 40, "--seed", 3)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("ROMEO:") and len(a.stdout) > len("ROMEO:\n")


def test_missing_path(tmp_path):
    proc = run_cli("prepare", tmp_path / "nope.txt", "-o", tmp_path / "ds")
    assert_user_error(proc, "nope.txt")
    assert not (tmp_path / "ds").exists()


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = run_cli("prepare", empty, "--tokenizer", "char", "-o", tmp_path / "ds")
    assert_user_error(proc, "empty")
    assert not (tmp_path / "ds").exists()


def test_undecodable_bytes(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 ol\u00e9 ".encode("latin-1") * 10)
    proc = run_cli("prepare", bad, "--tokenizer", "char", "-o", tmp_path / "ds")
    assert_user_error(proc, "latin1.txt")
    assert not (tmp_path / "ds").exists()


def test_context_longer_than_data(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be " * 20)
    proc = run_cli("train", *tiny_overrides(short, tmp_path, **{"model.block_size": 512}))
    assert_user_error(proc, "block_size")
    assert not (tmp_path / "runs" / "tiny").exists()


def test_unknown_config_key(tmp_path):
    proc = run_cli("train", "optim.lrr=1e-3")
    assert_user_error(proc, "optim.lrr", "optim.lr")


def test_checkpoint_problems(small_text, tmp_path):
    proc = run_cli(
        "train",
        *tiny_overrides(
            small_text, tmp_path, **{"train.max_steps": 4, "schedule.warmup_steps": 2, "train.sample_tokens": 0}
        ),
    )
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "tiny"

    # a checkpoint from a different model shape
    proc = run_cli("train", "--resume", run_dir, "model.n_embd=64", "train.max_steps=8")
    assert_user_error(proc, "different model shape")

    # a truncated checkpoint
    weights = run_dir / "checkpoints" / "step_000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = run_cli("sample", run_dir)
    assert_user_error(proc, "truncated or corrupt")

    # a run directory without checkpoints, and no such directory
    assert_user_error(run_cli("sample", tmp_path), "no complete checkpoint")
    assert_user_error(run_cli("sample", tmp_path / "missing"), "does not exist")


@pytest.mark.parametrize("flag", [["--temperature", "-1"], ["--top-p", "2"]])
def test_bad_sampling_arguments(tmp_path, flag):
    assert_user_error(run_cli("sample", tmp_path, *flag), flag[0])


def _diagnose(text, tmp_path, *extra, n_layer=4):
    import json

    overrides = tiny_overrides(text, tmp_path, **{"model.n_layer": n_layer})
    proc = run_cli("diagnose", *overrides, *extra, "--steps", 2, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    return result, {row["layer"]: row for row in result["layers"]}


def test_diagnose_pre_and_post_norm_profiles(small_text, tmp_path):
    pre, pre_layers = _diagnose(small_text, tmp_path, "model.norm_placement=pre")
    post, post_layers = _diagnose(small_text, tmp_path, "model.norm_placement=post")
    blocks = [f"block.{i}" for i in range(4)]
    assert list(pre_layers) == ["embedding", *blocks, "head"]
    assert list(post_layers) == ["embedding", *blocks]  # post-norm: no final norm, head tied to the embedding
    # post-norm blocks end in a norm: their outputs have RMS ~1; pre-norm's residual stream stays near the
    # embedding scale and grows with depth
    assert all(abs(post_layers[b]["act_rms"] - 1) < 0.05 for b in blocks)
    assert all(pre_layers[b]["act_rms"] < 0.5 for b in blocks)
    assert pre_layers["block.3"]["act_rms"] > pre_layers["block.0"]["act_rms"]
    # Xiong et al.: the last/first block gradient ratio at init is larger for post-norm than for pre-norm
    ratio = {
        name: layers["block.3"]["grad_norm"] / layers["block.0"]["grad_norm"]
        for name, layers in (("pre", pre_layers), ("post", post_layers))
    }
    assert ratio["post"] > ratio["pre"]
    assert pre["verdict"] == "healthy"


def test_diagnose_finds_exploding_flow(small_text, tmp_path):
    result, _ = _diagnose(small_text, tmp_path, "model.norm_placement=none", "model.init=kaiming", n_layer=12)
    assert result["verdict"] == "exploding" and "model.init=scaled" in result["suggestion"]


def test_diagnose_a_run_directory(small_text, tmp_path):
    proc = run_cli("train", *tiny_overrides(small_text, tmp_path, **{"train.max_steps": 4, "schedule.warmup_steps": 2}))
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "tiny"
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*")}
    proc = run_cli("diagnose", run_dir, "--steps", 1)
    assert proc.returncode == 0, proc.stderr
    assert "at step 4" in proc.stdout and "verdict:" in proc.stdout
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*")} == before  # only read
    assert_user_error(run_cli("diagnose", tmp_path / "nothing-here"), "nothing-here")


def test_bpe_run_reports_bits_per_byte(small_text, tmp_path):
    """A trained byte-level BPE through the CLI: val bits per byte in eval.jsonl, and comparable to a char run."""
    import json

    proc = run_cli(
        "train",
        *tiny_overrides(
            small_text,
            tmp_path,
            **{"data.tokenizer": "bpe", "data.bpe_vocab_size": 400, "train.max_steps": 6, "schedule.warmup_steps": 2},
        ),
    )
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "tiny"
    last = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])
    meta = json.loads((run_dir / "checkpoints" / "step_000006" / "tokenizer.json").read_text())
    assert meta  # the trained tokenizer travels with the checkpoint
    # bits per byte = loss / ln 2 / (bytes per token); BPE packs several bytes into a token
    assert 0 < last["val_bpb"] < last["val_loss"] / 0.6931


def test_diagnose_runs_the_trainers_own_loop(small_text, tmp_path, monkeypatch):
    """The steps diagnose observes are Trainer.steps()'s, and its records are the ones that loop writes."""
    from flowtrain import cli
    from flowtrain.train.trainer import Trainer

    driven = []
    real_steps = Trainer.steps

    def steps(self, until=None):
        for step in real_steps(self, until):
            driven.append(step)
            yield step

    monkeypatch.setattr(Trainer, "steps", steps)
    assert cli.main(["diagnose", *tiny_overrides(small_text, tmp_path), "--steps", "3", "--json"]) == 0
    assert driven == [1, 2, 3]
    assert not list((tmp_path / "runs").glob("*"))  # nothing written outside the scratch directory


def test_a_trainer_built_in_user_code_leaves_the_process_alone(small_text, tmp_path):
    """Only the command tunes the CPU allocator; Trainer(cfg) in a script changes nothing process-wide."""
    code = (
        "import sys; from flowtrain.config import load_config; from flowtrain.train import runtime; "
        "from flowtrain.train.trainer import Trainer; Trainer(load_config('default', sys.argv[1:])); "
        "print(runtime.allocator())"
    )
    proc = subprocess.run([sys.executable, "-c", code, *tiny_overrides(small_text, tmp_path)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "default (not tuned)"


def _user_namespaces() -> bool:
    """Whether this machine lets an unprivileged process mount a tmpfs of its own (unshare -rm)."""
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_a_full_disk_mid_checkpoint_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path):
    """A real full disk: the run directory on a 600 kB tmpfs holds the first checkpoint (~360 kB) but not the
    second. Exit 2, one line saying how much space a checkpoint needs, the partial checkpoint removed and the
    first one intact (checked inside the namespace, where the tmpfs lives)."""
    if not _user_namespaces():
        pytest.skip("needs `unshare -rm` (user namespaces) to mount a small tmpfs")
    from tests.train import killing

    text = killing.corpus(tmp_path / "corpus.txt", kb=20)
    runs = tmp_path / "runs"
    runs.mkdir()
    run = runs / "full"
    check = (  # every file's hash against meta.json (what read_checkpoint checks), without importing torch
        f"import hashlib, json, pathlib; p = pathlib.Path('{run}/checkpoints/step_000003'); "
        "m = json.loads((p / 'meta.json').read_text()); "
        "assert all(hashlib.sha256((p / n).read_bytes()).hexdigest() == h for n, h in m['sha256'].items())"
    )
    script = (
        f'mount -t tmpfs -o size=600k none {runs} && "$@"; rc=$?; ls -A {run}/checkpoints; '
        f'"{sys.executable}" -c "{check}" && echo intact; exit $rc'
    )
    args = killing.overrides(
        text, tmp_path, "full", **{"train.max_steps": 12, "optim.name": "adamw", "optim.adamw_lr_scale": 1}
    )  # sizes: Adam
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-m", "flowtrain", "train", *args],
        capture_output=True,
        text=True,
        env=killing.env(),
        timeout=300,
    )
    assert_user_error(proc, "no space left on the device for checkpoint step_000006", "it needs about 0.4 MB")
    assert "the earlier checkpoints are intact" in proc.stderr and f"--resume {run}" in proc.stderr
    assert proc.stdout.split() == ["step_000003", "intact"]
