"""DDP and FSDP2 on CPU: 2 processes over gloo, started with real torchrun (or torch.multiprocessing where a
test inspects in-process state). The reference is always a plain 1-process run on the same global batch:
1 process x grad_accum 2 == 2 ranks x 1 micro-batch each."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from flowtrain.config import load_config
from flowtrain.errors import CheckpointError, ConfigError
from flowtrain.sinks.jsonl import read_jsonl
from flowtrain.train import checkpoint as ckpt
from flowtrain.train.distributed import resolve_strategy, slot_layout
from flowtrain.train.load import config_for_resume
from flowtrain.train.trainer import Trainer
from tests.conftest import tiny_overrides as _tiny_overrides
from tests.conftest import write_corpus


def tiny_overrides(text, tmp, **extra):
    """The tests' tiny run with the classic recipe (AdamW 2e-3, cosine): these compare data-parallel runs with
    one process (FSDP refuses Muon), and the guard's actions with the rows they expect."""
    classic = {
        "optim.name": "adamw",
        "optim.adamw_lr_scale": 1,
        "optim.lr": 2e-3,
        "schedule.kind": "cosine",
        "schedule.min_lr": 2e-4,
    }
    return _tiny_overrides(text, tmp, **{**classic, **extra})


pytestmark = pytest.mark.distributed
HELPER = Path(__file__).with_name("dist_nan_helper.py")
REL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


def _close(a: float, b: float, rel: float = REL) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One reference run and one DDP and one FSDP2 run of 20 steps (checkpoints at 10 and 20)."""
    tmp = tmp_path_factory.mktemp("dist")
    text = write_corpus(tmp / "small.txt")

    def overrides(name, **extra):
        return tiny_overrides(text, tmp, **{"train.grad_accum": 2, "train.run_name": name, **extra})

    torch.set_num_threads(1)
    ref = Trainer(load_config("default", overrides("ref", **{"train.parallel": "none"}))).run_loop().run_dir
    ddp = _torchrun(["-m", "flowtrain", "train", *overrides("ddp", **{"train.parallel": "ddp"})], tmp)
    _torchrun(
        [
            "-m",
            "flowtrain",
            "train",
            *overrides("fsdp", **{"train.parallel": "fsdp", "train.checkpoint_format": "sharded"}),
        ],
        tmp,
    )
    runs_dir = tmp / "runs"
    return {
        "ref": ref,
        "ddp": runs_dir / "ddp",
        "fsdp": runs_dir / "fsdp",
        "stdout": {"ddp": ddp.stdout},
        "text": text,
        "tmp": tmp,
    }


def _per_layer(run_dir: Path, kind: str, stat: str) -> dict[tuple[int, str], float]:
    rows = pq.read_table(run_dir / "flow.parquet").to_pylist()
    return {(r["step"], r["name"]): r[stat] for r in rows if r["kind"] == kind}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_losses_and_gradient_norms_equal_one_process(runs, strategy):
    ref, got = _metrics(runs["ref"]), _metrics(runs[strategy])
    assert [m["step"] for m in got] == list(range(1, 21))
    for a, b in zip(ref, got, strict=True):
        assert _close(a["loss"], b["loss"]), (a["step"], a["loss"], b["loss"])
        for key in ("grad_norm_preclip", "grad_norm_postclip", "clip_coef"):
            assert _close(a[key], b[key]), (a["step"], key, a[key], b[key])
        assert a["tokens"] == b["tokens"]  # the global batch, counted over all ranks
    for kind in ("layer", "tensor"):
        for stat in ("grad_norm", "grad_max_abs", "grad_rms", "weight_norm", "adam_v_rms"):
            want, have = _per_layer(runs["ref"], kind, stat), _per_layer(runs[strategy], kind, stat)
            assert want.keys() == have.keys()
            bad = [(k, want[k], have[k]) for k in want if not _close(want[k], have[k], 1e-4)]
            assert not bad, (kind, stat, bad[:3])
    # per-layer gradient norms are exact combinations of the per-tensor ones (independent recomputation)
    tensors = _per_layer(runs[strategy], "tensor", "grad_norm")
    rows = pq.read_table(runs[strategy] / "flow.parquet").to_pylist()
    layer_of = {r["name"]: r["layer"] for r in rows if r["kind"] == "tensor"}
    for (step, layer), value in _per_layer(runs[strategy], "layer", "grad_norm").items():
        parts = [v for (s, n), v in tensors.items() if s == step and layer_of[n] == layer]
        assert _close(value, math.sqrt(sum(v * v for v in parts)), 1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_update_norms_equal_one_process(runs, strategy):
    for kind in ("layer", "tensor"):
        want, have = _per_layer(runs["ref"], kind, "update_norm"), _per_layer(runs[strategy], kind, "update_norm")
        assert want.keys() == have.keys()
        assert all(_close(want[k], have[k], 1e-4) for k in want)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_depth_statistics_describe_the_global_batch(runs, strategy):
    """Residual gradients, activations and logits combine over ranks into the one-process numbers."""
    for stat in ("resid_grad_norm", "act_rms", "act_max_abs"):
        want, have = _per_layer(runs["ref"], "depth", stat), _per_layer(runs[strategy], "depth", stat)
        assert want.keys() == have.keys() and want
        bad = [(k, want[k], have[k]) for k in want if not _close(want[k], have[k], 1e-4)]
        assert not bad, (stat, bad[:3])
    for key in ("logits_max_abs", "logits_lse_mean"):
        for a, b in zip(_metrics(runs["ref"]), _metrics(runs[strategy]), strict=True):
            assert _close(a[key], b[key], 1e-4), (key, a["step"], a[key], b[key])
    # attention is a per-rank sample (each rank's first sequence, averaged): present, not equal
    entropy = _per_layer(runs[strategy], "depth", "attn_entropy")
    assert any(v == v and v > 0 for v in entropy.values())


def test_only_rank_zero_writes_and_prints(runs):
    run = runs["ddp"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000010", "step_000020"]
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert json.loads((run / "summary.json").read_text())["steps"] == 20
    assert runs["stdout"]["ddp"].count("run directory:") == 1
    assert [e["step"] for e in read_jsonl(run / "eval.jsonl")] == [10, 20]


def test_checkpoint_layouts(runs):
    full = ckpt.read_checkpoint(runs["ddp"] / "checkpoints" / "step_000010")
    sharded = ckpt.read_checkpoint(runs["fsdp"] / "checkpoints" / "step_000010")
    assert full.layout == "full" and (full.path / "model.safetensors").is_file()
    assert sharded.layout == "sharded" and not (sharded.path / "model.safetensors").exists()
    assert len(list((sharded.path / "dcp").glob("*.distcp"))) == 2  # one file per rank
    meta = json.loads((sharded.path / "meta.json").read_text())
    assert {"dcp/.metadata", "state.json"} <= set(meta["sha256"])  # the shards are checksummed too
    loaders = full.state["loader"]  # per-slot loader positions from both ranks
    assert [s["rank"] for s in loaders] == [0, 1] and all(s["step"] == 10 for s in loaders)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_checkpoint_resumes_on_one_rank(runs, strategy, tmp_path):
    """Stop the 2-rank run at step 10 (its checkpoint), continue on 1 process: the same loss curve."""
    run = tmp_path / strategy
    shutil.copytree(runs[strategy], run)
    shutil.rmtree(run / "checkpoints" / "step_000020")
    cfg = config_for_resume(run, ["train.parallel=none"])
    resumed = Trainer(cfg, resume_dir=run).run_loop()
    assert resumed.steps == 20
    ref = _metrics(runs["ref"])
    got = _metrics(run)
    assert [m["step"] for m in got] == list(range(1, 21))
    for a, b in zip(ref[10:], got[10:], strict=True):
        assert _close(a["loss"], b["loss"]) and _close(a["grad_norm_preclip"], b["grad_norm_preclip"]), (a, b)


def test_more_ranks_than_micro_batches_share_each_one(runs, tmp_path):
    """The default grad_accum=1 under torchrun --nproc_per_node 2: the two ranks share the one micro-batch, each
    taking half of its rows. The numbers are one process's, and its checkpoint resumes in one process."""
    extra = {"train.grad_accum": 1, "train.max_steps": 8, "train.checkpoint_interval": 4, "train.eval_interval": 4}

    def overrides(name, parallel):
        return tiny_overrides(runs["text"], tmp_path, **{**extra, "train.run_name": name, "train.parallel": parallel})

    ref = _metrics(Trainer(load_config("default", overrides("one", "none"))).run_loop().run_dir)
    _torchrun(["-m", "flowtrain", "train", *overrides("two", "ddp")], tmp_path)
    run = tmp_path / "runs" / "two"
    got = _metrics(run)
    assert [m["step"] for m in got] == list(range(1, 9))
    for a, b in zip(ref, got, strict=True):
        for key in ("loss", "grad_norm_preclip", "clip_coef"):
            assert _close(a[key], b[key]), (a["step"], key, a[key], b[key])
        assert a["tokens"] == b["tokens"]
    loader = ckpt.read_checkpoint(run / "checkpoints" / "step_000004").state["loader"]
    assert loader["world_size"] == 1 and loader["step"] == 4  # one stream: the 1-process format
    shutil.rmtree(run / "checkpoints" / "step_000008")
    Trainer(config_for_resume(run, ["train.parallel=none"]), resume_dir=run).run_loop()
    for a, b in zip(ref[4:], _metrics(run)[4:], strict=True):
        assert _close(a["loss"], b["loss"]), (a["step"], a["loss"], b["loss"])


@pytest.mark.parametrize(("strategy", "action"), [("ddp", "skip"), ("ddp", "rollback"), ("fsdp", "rollback")])
def test_nan_on_one_rank_makes_every_rank_act_alike(runs, strategy, action):
    """Rank 1 alone gets the NaN; with guard.nonfinite=skip every rank skips the step, with rollback every rank
    rolls back to the last snapshot (FSDP2: sharded snapshots). The run finishes; DDP replicas stay identical."""
    tmp = runs["tmp"]
    name = f"nan-{strategy}-{action}"
    out = tmp / name
    out.mkdir()
    extra = {
        "train.parallel": strategy,
        "train.grad_accum": 2,
        "train.run_name": name,
        "train.max_steps": 12,
        "guard.nonfinite": action,
        "guard.snapshot_interval": 5,
    }
    _torchrun([str(HELPER), str(out), "7", *tiny_overrides(runs["text"], tmp, **extra)], tmp)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["steps"] == 12 for r in ranks)  # the run continued to the end
    for r in ranks:
        acted = [(d["step"], d["action"]) for d in r["decisions"] if d["action"] != "proceed"]
        assert acted == [(7, action)], (r["rank"], r["decisions"])
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    if strategy == "ddp":
        assert ranks[0]["weights"] == ranks[1]["weights"]  # no replica diverged
    assert all(math.isfinite(w) for r in ranks for w in r["weights"])
    run = tmp / "runs" / name
    summary = json.loads((run / "summary.json").read_text())
    if action == "skip":
        assert [m["step"] for m in _metrics(run) if m["skipped"]] == [7]
        assert summary["skipped_steps"] == 1
    else:
        assert summary["rollbacks"] == 1
        alerts = read_jsonl(run / "alerts.jsonl")  # FSDP: rank 0 saw the NaN too (the norm is global)
        assert {(a["step"], a["action"]) for a in alerts} == {(7, "rollback")}
        assert "guard" in {a["detector"] for a in alerts}


def test_sharded_checkpoint_in_one_process_resumes_bitwise_and_vets_pickles(runs, tmp_path):
    text = runs["text"]
    extra = {"train.checkpoint_format": "sharded", "train.max_steps": 12, "train.checkpoint_interval": 6}
    straight = Trainer(load_config("default", tiny_overrides(text, tmp_path, **{**extra, "train.run_name": "a"})))
    full = _metrics(straight.run_loop().run_dir)
    split = Trainer(
        load_config("default", tiny_overrides(text, tmp_path, **{**extra, "train.run_name": "b"})), stop_after=6
    )
    run = split.run_loop().run_dir
    Trainer(config_for_resume(run, []), resume_dir=run).run_loop()
    assert [m["loss"] for m in _metrics(run)] == [m["loss"] for m in full]

    # a tampered index that would run code on unpickling is refused, even with a matching checksum
    c = run / "checkpoints" / "step_000006"
    (c / "dcp" / ".metadata").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    meta = json.loads((c / "meta.json").read_text())
    meta["sha256"]["dcp/.metadata"] = ckpt.sha256_file(c / "dcp" / ".metadata")
    (c / "meta.json").write_text(json.dumps(meta))
    trainer = Trainer(load_config("default", tiny_overrides(text, tmp_path, **{**extra, "train.run_name": "c"})))
    with pytest.raises(CheckpointError, match="os.system"):
        ckpt.restore_model(ckpt.read_checkpoint(c), trainer.raw_model)

    # a damaged shard (checksum updated to match): DCP raises its CheckpointException, a BaseException that
    # would escape `except Exception`; it arrives as one line
    c = run / "checkpoints" / "step_000012"
    shard = next((c / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 3 // 4])
    meta = json.loads((c / "meta.json").read_text())
    meta["sha256"][f"dcp/{shard.name}"] = ckpt.sha256_file(shard)
    (c / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="the sharded state cannot be read .*resume from an earlier") as info:
        ckpt.restore_optimizer(ckpt.read_checkpoint(c), trainer.state.optimizer, trainer.raw_model)
    assert "\n" not in str(info.value)


def test_slot_layout_splits_slots_or_rows_over_ranks_and_strategy_resolution():
    assert slot_layout(8, 4, 16) == (2, 1)  # whole micro-batches per rank
    assert slot_layout(1, 2, 16) == (1, 2) and slot_layout(2, 8, 16) == (1, 4)  # ranks share a micro-batch's rows
    with pytest.raises(ConfigError, match=r"grad_accum=3 and the world size 2"):
        slot_layout(3, 2, 16)
    with pytest.raises(ConfigError, match=r"batch_size=6 .* 4 ranks"):
        slot_layout(1, 4, 6)
    assert resolve_strategy("auto", 1) == "none" and resolve_strategy("auto", 2) == "ddp"
    assert resolve_strategy("fsdp", 1) == "fsdp"
    with pytest.raises(ConfigError, match="WORLD_SIZE=2"):
        resolve_strategy("none", 2)


# ---- tensorstats and clipping on DTensor shards (torch.multiprocessing: the test inspects values) ---------
def _sharded_stats_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from flowtrain import tensorstats
    from flowtrain.optim.clipping import GradClipper
    from flowtrain.optim.config import ClipConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(0)
    # [1, 5] leaves rank 1 an empty shard (FSDP's uneven dim-0 split); one tensor holds an Inf
    full = [torch.randn(7, 3, generator=gen), torch.randn(1, 5, generator=gen), torch.randn(4, generator=gen) * 9]
    full[2][3] = float("inf")
    sharded = [distribute_tensor(t, mesh, [Shard(0)]) for t in full]
    result = {
        name: (fn(sharded).tolist(), fn(full).tolist())
        for name, fn in [
            ("sums_of_squares", tensorstats.sums_of_squares),
            ("max_abs", tensorstats.max_abs),
            ("nonfinite_counts", tensorstats.nonfinite_counts),
            ("sums", tensorstats.sums),
            ("numels", tensorstats.numels),
        ]
    }
    # global-norm clipping of sharded gradients == clipping the full gradients
    params, plain = [], []
    for t in full[:2]:
        p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(t), mesh, [Shard(0)]))
        p.grad = distribute_tensor(t.clone(), mesh, [Shard(0)])
        q = torch.nn.Parameter(torch.zeros_like(t))
        q.grad = t.clone()
        params.append(p)
        plain.append(q)
    clip = GradClipper(ClipConfig(kind="norm", max_norm=0.5))
    a, b = clip(params), clip(plain)
    result["clip"] = (
        [a.grad_norm_preclip.item(), a.grad_norm_postclip.item()],
        [b.grad_norm_preclip.item(), b.grad_norm_postclip.item()],
    )
    result["clipped_grads"] = (
        [p.grad.full_tensor().sum().item() for p in params],
        [q.grad.sum().item() for q in plain],
    )
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    # skip interpreter finalization: there gloo's worker threads (torch 2.13) abort the process now and then
    # ("terminate called without an active exception"), after every result is written
    os._exit(0)


def test_tensorstats_and_clipping_complete_dtensor_shards(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sharded_stats_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        for name, (sharded, full) in result.items():
            assert sharded == pytest.approx(full, rel=1e-6), (rank, name, sharded, full)


def test_one_process_checkpoint_resumes_on_two_fsdp_ranks(runs, tmp_path):
    """The other direction: a full 1-process checkpoint is sharded into FSDP2 on resume (model and optimizer)."""
    run = tmp_path / "grow"
    shutil.copytree(runs["ref"], run)
    shutil.rmtree(run / "checkpoints" / "step_000020")
    _torchrun(["-m", "flowtrain", "train", "--resume", str(run), "train.parallel=fsdp"], tmp_path)
    ref, got = _metrics(runs["ref"]), _metrics(run)
    assert [m["step"] for m in got] == list(range(1, 21))
    for a, b in zip(ref[10:], got[10:], strict=True):
        assert _close(a["loss"], b["loss"]) and _close(a["grad_norm_preclip"], b["grad_norm_preclip"]), (a, b)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=", 1)[1])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc (Linux)")
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Preemption reaches ranks at different moments (here: only rank 1 gets SIGTERM): the ranks agree, all
    stop after the same step, rank 0 writes that step's checkpoint, and the job exits 0."""
    from tests.train import killing

    text = killing.corpus(tmp_path / "corpus.txt", kb=20)
    extra = {"train.grad_accum": 2, "train.parallel": "ddp", "train.max_steps": 2000}
    extra.update({"train.checkpoint_interval": 5000, "train.eval_interval": 5000, "train.eval_full_at_end": False})
    args = killing.overrides(text, tmp_path, "ddp", **extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    job = subprocess.Popen(
        [*cmd, "-m", "flowtrain", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**killing.env(), "PYTHONWARNINGS": "ignore"},
    )
    run = tmp_path / "runs" / "ddp"
    try:
        killing.poll(job, lambda: killing.logged_steps(run) >= 3, timeout=180, every=0.01)
        workers = {_rank_of(pid): pid for pid in _children(job.pid)}
        os.kill(workers[1], signal.SIGTERM)
        out, err = job.communicate(timeout=180)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, err[-3000:]
    stops = re.findall(r"flowtrain: stopped by SIGTERM after step (\d+), checkpoint (\S+) holds it", err)
    assert len(stops) == 2 and stops[0] == stops[1], err[-3000:]  # rank 1 (signalled) and rank 0 (agreed)
    step = int(stops[0][0])
    assert 3 <= step < 2000 and ckpt.read_checkpoint(stops[0][1]).step == step
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step_{step:06d}"]
    assert read_jsonl(run / "metrics.jsonl")[-1]["step"] == step and not (run / "summary.json").exists()
