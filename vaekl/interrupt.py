"""Stopping training cleanly on SIGINT (Ctrl-C) and SIGTERM (what Slurm sends).

Inside `deferred_signals()` the first SIGINT or SIGTERM only sets a flag, which the
training loop reads after each epoch: it writes a checkpoint of the last completed
epoch and raises `Interrupted`, which the command line turns into one line and the exit
status 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as a shell reports a
process that the signal ended. A second SIGINT ends the process at once (status 130).
Other signals after the first change nothing: a launcher that terminates its runs after
the terminal's Ctrl-C reached them all still gets their checkpoints.

Python runs signal handlers in the main thread between bytecodes only, so during an
epoch (one long device call) a handler would run only at its end, and two Ctrl-Cs in
that time would arrive as one. The signals are therefore read by a thread from
`signal.set_wakeup_fd`, which the interpreter writes at once: it acknowledges the first
with a log line and ends the process at the second SIGINT.
"""

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from absl import logging

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Training stopped by signal `signum`; the checkpoint of `step` is written."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"interrupted at step {step}; rerun the same command to resume")
        self.step, self.signum = step, signum

    @property
    def exit_code(self) -> int:
        """128 + the signal's number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


class StopFlag:
    """`signum`: the signal that asked to stop, or None while none has come."""

    def __init__(self):
        self.signum = None


@contextlib.contextmanager
def deferred_signals() -> Iterator[StopFlag]:
    """SIGINT and SIGTERM set the yielded flag instead of stopping, for the duration.

    The previous handlers (and wakeup fd) are restored on exit. Outside the main thread,
    where Python cannot install handlers, the flag stays unset and signals act as usual.
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    # A Python-level handler is what makes the interpreter catch the signal (and write
    # the wakeup fd); it does nothing itself, since it would run only after the epoch.
    previous = {s: signal.signal(s, _ignore) for s in SIGNALS}
    watcher = threading.Thread(target=_watch, args=(read_fd, flag), daemon=True,
                               name="vaekl-signals")
    watcher.start()
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(write_fd)  # The watcher reads the end of the pipe and returns.
        watcher.join()
        os.close(read_fd)


def _ignore(signum, frame):
    del signum, frame


def _watch(read_fd: int, flag: StopFlag) -> None:
    """Reads signal numbers from the wakeup pipe until it closes.

    Only a second SIGINT ends the process: a SIGINT and a SIGTERM that come together
    (the terminal's Ctrl-C and a launcher's SIGTERM) may be read in either order, since
    the threads that take them write the pipe concurrently.
    """
    sigints = 0
    while data := os.read(read_fd, 16):
        for signum in data:
            if signum not in SIGNALS:
                continue
            sigints += signum == signal.SIGINT
            if sigints == 2:
                os.write(2, b"second SIGINT: exiting at once, without a checkpoint\n")
                os._exit(128 + signal.SIGINT)
            if flag.signum is None:
                flag.signum = signum
                logging.warning(
                    "%s: stopping after the epoch in flight, with a checkpoint%s.",
                    signal.Signals(signum).name,
                    " (Ctrl-C again exits at once)" if signum == signal.SIGINT else "")
