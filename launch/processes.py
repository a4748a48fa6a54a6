"""The P local processes of one multi-process run (`launch.sweep --processes=P`).

Process i of P runs the run's command with

  VAEKL_COORDINATOR=127.0.0.1:PORT  a port free on this machine, the same for all P
  VAEKL_NUM_PROCESSES=P, VAEKL_PROCESS_ID=i
  JAX_LOCAL_DEVICE_IDS=i            process i uses GPU i, unless the environment sets it

which `vaekl.distributed.initialize` turns into `jax.distributed.initialize`. A
`ProcessGroup` stands for the P processes where the executors hold one
`subprocess.Popen`: it has ended when all have exited 0, or as soon as one exits
non-zero, after which it stops the others (SIGTERM, then SIGKILL after
`STOP_GRACE_S`), so a lost process never leaves its siblings waiting.
"""

import signal
import socket
import subprocess
import time
from collections.abc import Sequence

STOP_GRACE_S = 10.0


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(env: dict, *, port: int, processes: int, process: int) -> dict:
    """`env` with what process `process` of `processes` needs to find the others."""
    out = dict(env, VAEKL_COORDINATOR=f"127.0.0.1:{port}", VAEKL_NUM_PROCESSES=str(processes),
               VAEKL_PROCESS_ID=str(process))
    out.setdefault("JAX_LOCAL_DEVICE_IDS", str(process))
    return out


class ProcessGroup:
    """The processes of one run, with the parts of `subprocess.Popen` the executors use.

    Attributes:
      returncode: None while running; 0 when every process exited 0; else the exit
        code of the first process found to have exited non-zero.
      failed_process: the index of that process (None unless one failed).
    """

    def __init__(self, procs: Sequence[subprocess.Popen]):
        self._procs = list(procs)
        self.returncode: int | None = None
        self.failed_process: int | None = None

    @property
    def pid(self) -> int:
        """Process 0's pid."""
        return self._procs[0].pid

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def poll(self) -> int | None:
        """The group's return code once it has ended (stopping the rest after a failure)."""
        if self.returncode is not None:
            return self.returncode
        codes = [p.poll() for p in self._procs]
        failed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
        if failed is not None:
            self.failed_process = failed
            self.terminate()
            self.returncode = codes[failed]
        elif all(code == 0 for code in codes):
            self.returncode = 0
        return self.returncode

    def wait(self, poll_s: float = 0.1) -> int:
        while self.poll() is None:
            time.sleep(poll_s)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.send_signal(sig)

    def terminate(self) -> None:
        """Ends every process still running: SIGTERM, then SIGKILL after STOP_GRACE_S.

        SIGTERM ends a process at once outside training; in training it stops after the
        epoch in flight with a checkpoint (`vaekl.interrupt`), unless that needs a
        process that has died: then its next collective fails, or it waits for the dead
        one (up to `vaekl.distributed.HEARTBEAT_TIMEOUT_S`) and SIGKILL ends it.
        """
        self.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in self._procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
