"""The `train` command's signal handling (flowtrain.interrupts) in a real process with real signals: the
first signal asks the loop to stop, a second exits at once; under torchrun a copy of the first is ignored.
(The whole path with a real training run: tests/train/test_kill.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.train.killing import env

# A process whose "trainer" takes stop requests and never stops by itself: only a second signal ends it.
_WAITING = """
import sys, time
from flowtrain.interrupts import Interrupted, StopOnSignals

class Loop:
    def request_stop(self, reason):
        print("stop requested:", reason, flush=True)
        return sys.argv[1] == "loop"

try:
    with StopOnSignals() as stops:
        stops.trainer = Loop()
        print("ready", flush=True)
        time.sleep(60)
except Interrupted as exc:
    print("interrupted:", exc.name, flush=True)
    sys.exit(7)
"""


def _start(where: str, **extra_env) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WAITING, where],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env(), **extra_env},
    )
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_a_second_signal_exits_at_once():
    proc = _start("loop")
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline() == "stop requested: SIGTERM\n"
    first = proc.stderr.readline()  # the first handler has finished with it
    assert (
        first
        == "flowtrain: SIGTERM: stopping at the end of this step, with a checkpoint (SIGTERM again exits at once)\n"
    )
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, (out, err)
    assert err.splitlines() == ["flowtrain: SIGINT again: exiting at once; nothing was trained"]


def test_outside_the_loop_a_signal_stops_the_command_where_it_is():
    proc = _start("setup")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 7 and out.splitlines() == ["stop requested: SIGINT", "interrupted: SIGINT"]


def test_under_torchrun_the_copy_of_a_signal_is_the_same_request():
    """torchrun forwards the signal its workers already got from the terminal or SLURM: that copy, arriving
    within a second, must not turn a clean stop into an immediate exit; a signal later than that does."""
    proc = _start("loop", TORCHELASTIC_RUN_ID="test")
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline() == "stop requested: SIGTERM\n"
    assert "stopping at the end of this step" in proc.stderr.readline()
    proc.send_signal(signal.SIGTERM)  # the forwarded copy
    time.sleep(0.3)
    assert proc.poll() is None
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=10)
    assert proc.returncode == 128 + signal.SIGTERM


_ENDING = """
import sys, time
from flowtrain.interrupts import StopOnSignals

with StopOnSignals(to_the_end=True):
    pass
print("work done", flush=True)
time.sleep(1)  # the process ending (interpreter teardown can take this long with torch loaded)
sys.exit(5)
"""


def test_a_signal_after_the_work_is_done_leaves_the_exit_code_alone():
    """`flowtrain train` keeps its handlers to the end of the process: SIGTERM arriving while a finished run's
    process exits does not turn its result into a death by signal."""
    proc = subprocess.Popen([sys.executable, "-c", _ENDING], stdout=subprocess.PIPE, text=True, env=env())
    assert proc.stdout.readline() == "work done\n"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=10)
    assert proc.returncode == 5
