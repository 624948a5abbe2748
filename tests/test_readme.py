"""Every command of README.md runs as written, so the README cannot drift from the code.

The ```bash blocks are read from README.md itself, line by line, and each command is run in one scratch
directory (where the paths the README names, like path/to/tinyshakespeare.txt, exist): `flowtrain ...` through
the command's own entry point (cli.main, in this process), `torchrun` and `tensorboard` as real processes.
Only settings that make it tiny are appended (a small model, a few steps, the test corpus); the README's own
arguments are parsed and validated first. The placeholder runs NAME, A and B are the first three runs
trained, `tuned` the one trained from an export (model.init_from). The lab's studies train for minutes each even
with --quick (tests/lab runs them): their lines are checked against the command's parser and the list of
studies instead. The ```python blocks run against a tiny flowtrain GPT, and every `record.<...>` the comments
mention is evaluated; the ones that use transformers run after the bash commands, on the directory exported.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import torch

from flowtrain import cli
from flowtrain.lab import STUDIES
from tests.conftest import corpus_text, write_corpus

README = Path(__file__).resolve().parents[1] / "README.md"
RUNS = ("NAME", "A", "B", "tuned", "torchrun")  # the runs the README's commands train, in order
# block_size 64: the README's transformers snippet generates 40 tokens after a prompt from the exported model
TINY_MODEL = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=64", "data.cache_dir=cache",
              "train.batch_size=2", "train.tune_allocator=false"]  # fmt: skip
TINY_TRAIN = [*TINY_MODEL, "data.sources=[small.txt]", "data.tokenizer=char", "train.max_steps=4",
              "train.eval_interval=2", "train.eval_batches=1", "train.checkpoint_interval=2", "train.sample_tokens=8",
              "log.console=false"]  # fmt: skip


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def loads_the_export(snippet: str) -> bool:
    """A snippet that loads the exported directory with transformers (run where the export exists)."""
    return 'from_pretrained("exported")' in snippet


def readme_commands() -> list[list[str]]:
    """Each command line of the bash blocks (continuations joined, comments dropped) as argv."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def _flowtrain(argv: list[str], run_names, capsys) -> None:
    sub = argv[1]
    if sub == "lab":  # minutes per study: parsed, not run (tests/lab runs the studies)
        args = cli.build_parser().parse_args(argv[1:])
        assert args.study in STUDIES, argv
        return
    extra: list[str] = []
    if sub == "train" and "--resume" in argv:
        extra = ["train.max_steps=6", "train.tune_allocator=false"]  # it continues from step 4
    elif sub == "train":
        extra = [*TINY_TRAIN, f"train.run_name={next(run_names)}"]
    elif sub == "diagnose" and "-c" in argv:
        extra = TINY_MODEL
    code = cli.main([*argv[1:], *extra])
    assert code == 0, (shlex.join(argv), capsys.readouterr().err[-3000:])


def _torchrun(argv: list[str]) -> None:
    exe = shutil.which("torchrun")
    launcher = [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([*launcher, *argv[1:], *TINY_TRAIN, "train.run_name=torchrun"], capture_output=True,
                          text=True, env=env, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "run directory: runs/torchrun" in done.stdout


def _tensorboard(argv: list[str]) -> None:
    """Start it as written (on a free port), see it serve its page, stop it."""
    exe = shutil.which("tensorboard")
    launcher = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
    proc = subprocess.Popen([*launcher, *argv[1:], "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            found = re.search(r"TensorBoard \S+ at (http://\S+/)", line)
            if found:
                with urllib.request.urlopen(found.group(1), timeout=30) as page:
                    assert page.status == 200
                return
        raise AssertionError(f"tensorboard exited ({proc.wait()}) without serving")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_bash_command_of_the_readme_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "small.txt")
    (tmp_path / "path" / "to").mkdir(parents=True)
    write_corpus(tmp_path / "path" / "to" / "tinyshakespeare.txt")
    write_corpus(tmp_path / "input.txt", 20_000)
    (tmp_path / "my_corpus").mkdir()
    for i in range(3):
        (tmp_path / "my_corpus" / f"part{i}.txt").write_text(corpus_text()[i * 20_000 : (i + 1) * 20_000])
    runners = {"flowtrain": _flowtrain, "torchrun": _torchrun, "tensorboard": _tensorboard}
    commands = readme_commands()
    run_names = iter(RUNS[:4])
    for argv in commands:
        assert argv[0] in runners, f"README command {shlex.join(argv)!r} has no runner here: add one"
        if argv[0] == "flowtrain":
            _flowtrain(argv, run_names, capsys)
        else:
            runners[argv[0]](argv)
    assert {a[0] for a in commands} == set(runners)
    summaries = {name: json.loads((tmp_path / "runs" / name / "summary.json").read_text()) for name in RUNS}
    assert summaries["NAME"]["steps"] == 6 and summaries["A"]["steps"] == 4  # NAME was resumed to step 6
    assert json.loads((tmp_path / "data" / "mine" / "meta.json").read_text())["tokenizer"]["kind"] == "bpe"
    assert (tmp_path / "report.html").is_file() and (tmp_path / "compare.html").is_file()
    assert len(list((tmp_path / "figs").glob("*.svg"))) >= 4
    # the export: a transformers directory the README's snippets load, and a run trained from it
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    tuned = (tmp_path / "runs" / "tuned" / "config.yaml").read_text()
    assert "init_from: exported" in tuned and "tokenizer_path: exported" in tuned
    snippets = [s for s in readme_blocks("python") if loads_the_export(s)]
    assert snippets
    for snippet in snippets:
        exec(compile(snippet, str(README), "exec"), {})


def _snippet_scope(snippet: str) -> dict:
    """What a snippet may assume: a tiny flowtrain GPT, its optimizer and a few batches; for the transformers
    one a tiny random GPT-2 and its dataset, for the Lightning one a module and its loader."""
    torch.manual_seed(0)
    if "transformers" in snippet:
        import transformers

        transformers.logging.set_verbosity_error()
        cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=16, vocab_size=50,
                                      bos_token_id=0, eos_token_id=0)  # fmt: skip
        rows = torch.randint(0, 50, (16, 16))
        return {"model": transformers.GPT2LMHeadModel(cfg), "train_dataset": [{"input_ids": r, "labels": r}
                                                                             for r in rows]}  # fmt: skip
    if "lightning" in snippet:
        import lightning

        from flowtrain.model.config import ModelConfig
        from flowtrain.model.gpt import GPT

        class Module(lightning.LightningModule):
            def __init__(self):
                super().__init__()
                self.gpt = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32))

            def training_step(self, batch, batch_idx):
                (idx,) = batch
                logits = self.gpt(idx[:, :-1])
                return torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-3)

        data = torch.utils.data.TensorDataset(torch.randint(0, 32, (16, 9)))
        return {"module": Module(), "train_loader": torch.utils.data.DataLoader(data, batch_size=4)}
    from flowtrain.model.config import ModelConfig
    from flowtrain.model.gpt import GPT

    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    data = torch.randint(0, 32, (3, 2, 9))
    return {
        "model": model,
        "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3),
        "batches": [(b[:, :-1], b[:, 1:]) for b in data],
        "loss_fn": lambda logits, y: torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()),
    }


def test_the_python_snippets_of_the_readme_run(tmp_path, monkeypatch, capsys):
    """Each snippet runs in a scratch directory; every `record.<...>` its comments mention is evaluated, and every
    `flowtrain report/diagnose RUN` they mention runs on the directory the snippet wrote."""
    monkeypatch.chdir(tmp_path)
    for snippet in [s for s in readme_blocks("python") if not loads_the_export(s)]:
        scope = _snippet_scope(snippet)
        exec(compile(snippet, str(README), "exec"), scope)
        for expression in re.findall(r"record\.\w+(?:\([^)]*\))?", snippet):
            value = eval(expression, scope)  # what the comments promise must exist
            assert value is not None and (not isinstance(value, (dict, list)) or value), expression
        for command, run in re.findall(r"flowtrain (report|diagnose) (runs/\w+)", snippet):
            code = cli.main([command, run])
            assert code == 0, (command, run, capsys.readouterr().err[-2000:])
