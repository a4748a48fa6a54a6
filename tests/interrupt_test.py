"""Tests of `vaekl.interrupt`: signals deferred to a flag, handlers restored, a second
SIGINT ends the process at once. Training runs that are interrupted are in
reliability_test.py and train_test.py."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from vaekl import interrupt

REPO = Path(__file__).resolve().parents[1]


def _wait_for(condition):
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "the signal never reached the flag"
        time.sleep(0.01)


def test_a_signal_sets_the_flag_and_the_previous_handlers_come_back():
    before = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    with interrupt.deferred_signals() as flag:
        assert flag.signum is None
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for(lambda: flag.signum is not None)
        os.kill(os.getpid(), signal.SIGTERM)  # A second SIGTERM changes nothing.
        time.sleep(0.1)
        assert flag.signum == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in interrupt.SIGNALS} == before
    previous_fd = signal.set_wakeup_fd(-1)
    assert previous_fd == -1  # The wakeup fd is restored too (none was set).


def test_interrupted_names_the_step_and_exits_with_128_plus_the_signal():
    e = interrupt.Interrupted(372, signal.SIGINT)
    assert str(e) == "interrupted at step 372; rerun the same command to resume"
    assert (e.exit_code, interrupt.Interrupted(1, signal.SIGTERM).exit_code) == (130, 143)


def test_outside_the_main_thread_signals_are_left_alone():
    seen = {}

    def body():
        with interrupt.deferred_signals() as flag:
            seen["handler"] = signal.getsignal(signal.SIGINT)
            seen["flag"] = flag.signum

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == {"handler": signal.getsignal(signal.SIGINT), "flag": None}


SECOND_SIGINT = """
import os, signal, sys, time
from vaekl import interrupt
with interrupt.deferred_signals() as flag:
    os.kill(os.getpid(), signal.SIGINT)
    while flag.signum is None:
        time.sleep(0.01)
    print("stopping", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)  # The work in flight, which the second SIGINT does not wait for.
print("finished", flush=True)
"""


def test_a_second_sigint_exits_at_once_with_status_130():
    proc = subprocess.run([sys.executable, "-c", SECOND_SIGINT], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 130, proc.stderr
    assert proc.stdout == "stopping\n"
    assert "SIGINT: stopping after the epoch in flight" in proc.stderr
    assert "second SIGINT: exiting at once, without a checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
