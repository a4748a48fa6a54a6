"""One run of a sweep: its command, its record (`launch.json`) and its state.

Every run lives in `ROOT/NAME` and is `python -m experiments.main --config=CONFIG
--workdir=ROOT/NAME --config.FIELD=VALUE ...`, started with the repository root as
working directory. Whoever starts it (the local pool, or a Slurm job) uses `start`
and `finish` here, so a run is the same process on either executor:

  ROOT/NAME/log.txt        stdout and stderr of every attempt, each after a header line
  ROOT/NAME/log.process1.txt, ...  the same of processes 1, 2, ... of a multi-process run
  ROOT/NAME/launch.json    the record: command, status, return code, times, host, pid, attempts
  ROOT/NAME/submitted.json Slurm only: the job that will run it (cluster, job id, host)
  ROOT/NAME/results.json   written by the experiment when it finishes

The state of a run (`state`) follows from those files:

  done         results.json exists
  running      launch.json says running and its process is alive (pid on this host; on
               another host, its Slurm job is in `squeue`)
  queued       submitted to Slurm and the job is waiting in the queue
  failed       the last attempt exited non-zero (or exited 0 without results.json)
  interrupted  the last attempt was stopped by SIGINT or SIGTERM (exit status 130 or 143,
               after its checkpoint), or launch.json says running or submitted but nothing
               is alive: a killed launcher, a cancelled or timed-out job; rerunning resumes it
  pending      never started
"""

import dataclasses
import datetime
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

from launch import processes as processes_lib
from launch import sweeps

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()

DONE, RUNNING, QUEUED, FAILED, INTERRUPTED, PENDING = (
    "done", "running", "queued", "failed", "interrupted", "pending")
STATES = (DONE, RUNNING, QUEUED, FAILED, INTERRUPTED, PENDING)
# Return codes of a run that SIGINT or SIGTERM stopped: vaekl's training exits 128 + the
# signal after its checkpoint; before training began the signal itself ends the process.
INTERRUPTED_CODES = {128 + signal.SIGINT: "SIGINT", 128 + signal.SIGTERM: "SIGTERM",
                     -signal.SIGINT: "SIGINT", -signal.SIGTERM: "SIGTERM"}


@dataclasses.dataclass(frozen=True)
class Run:
    """One run: a config, its overrides, and the directory it writes to.

    Attributes:
      name: the run's directory name (`sweeps.run_name` of `overrides`).
      workdir: absolute path of ROOT/NAME.
      config: the config file with optional `:arg`, relative to the repository root.
      overrides: the swept fields of this run.
      fixed: overrides shared by every run of the sweep.
    """

    name: str
    workdir: str
    config: str
    overrides: dict
    fixed: dict

    @property
    def path(self) -> Path:
        return Path(self.workdir)

    @property
    def log(self) -> Path:
        return self.path / "log.txt"

    def process_log(self, process: int) -> Path:
        """The log of process `process` of a multi-process run (process 0's is `log`)."""
        return self.log if process == 0 else self.path / f"log.process{process}.txt"

    @property
    def record_path(self) -> Path:
        return self.path / "launch.json"

    @property
    def submission_path(self) -> Path:
        return self.path / "submitted.json"

    @property
    def results(self) -> Path:
        return self.path / "results.json"

    @property
    def command(self) -> list[str]:
        """The argv of the run: this Python, `-m experiments.main`, config, workdir, overrides."""
        fields = {**self.fixed, **self.overrides}
        return [sys.executable, "-m", "experiments.main", f"--config={self.config}",
                f"--workdir={self.workdir}",
                *(f"--config.{k}={sweeps.format_value(v)}" for k, v in fields.items())]


def from_sweep(sweep: sweeps.Sweep, root: Path) -> list[Run]:
    """The runs of `sweep`, each in `root/NAME` (an absolute path)."""
    root = Path(root).resolve()
    return [Run(name=name, workdir=str(root / name), config=sweep.config, overrides=overrides,
                fixed=dict(sweep.fixed)) for name, overrides in sweep.named_runs()]


def now() -> str:
    """The local time as ISO 8601 with offset, to the second."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _code_version() -> str | None:
    from experiments.report import code_version  # Imported on use: it brings JAX (see below).

    return code_version()


def _write_json(path: Path, obj) -> None:
    # launch.json is a file of the run's workdir like results.json: both are written by
    # vaekl's one atomic JSON writer. Imported on the first write, not above: `import vaekl`
    # brings JAX, which --status and --dry_run need not wait for.
    from vaekl.workdir import write_json

    write_json(path, obj)


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when there is no such file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def read_record(run: Run) -> dict | None:
    """The run's launch.json, or None when it was never started."""
    return read_json(run.record_path)


def check_matches(run: Run) -> None:
    """Checks that an existing record in the run's directory is of this same run.

    Raises:
      ValueError: naming `--root` when the directory holds a run of another config or
        other overrides (two sweeps sharing one root and one run name).
    """
    record = read_record(run)
    if record is None:
        return
    recorded = (record.get("config"), record.get("overrides"), record.get("fixed"))
    expected = json.loads(json.dumps((run.config, run.overrides, run.fixed)))
    # By leaf names: a run recorded with the flat config's overrides ({"kl": ...}) is the
    # same run as one of the nested config's ({"loss.kl": ...}).
    if [recorded[0], *(sweeps.leaves(d or {}) for d in recorded[1:])] != [
            expected[0], *(sweeps.leaves(d) for d in expected[1:])]:
        raise ValueError(
            f"--root: {run.workdir} holds a run of config {recorded[0]!r} with overrides"
            f" {recorded[1]} and fixed {recorded[2]}, not {run.config!r} with {run.overrides}"
            f" and {run.fixed}; use another --root for this sweep.")


def _base_record(run: Run, status: str, **fields) -> dict:
    previous = read_record(run) or {}
    return dict(name=run.name, config=run.config, overrides=run.overrides, fixed=run.fixed,
                command=run.command, log=str(run.log), status=status,
                attempts=previous.get("attempts", 0), **fields)


def start(run: Run, *, executor: str = "local", cluster: str | None = None,
          job_id: str | None = None, env: dict | None = None,
          processes: int = 1) -> subprocess.Popen | processes_lib.ProcessGroup:
    """Starts one attempt of `run` as a subprocess; records it as running.

    Args:
      run: the run.
      executor: "local" or "slurm", recorded in launch.json.
      cluster: for Slurm jobs, submitit's cluster ("slurm" or "local").
      job_id: for Slurm jobs, the job id.
      env: the subprocess's environment; None: this process's.
      processes: > 1 starts the run as that many local processes joined by
        `jax.distributed` (`launch.processes`), process i writing `run.process_log(i)`.

    Returns:
      The process, writing to the run's log.txt (a `ProcessGroup` for processes > 1).
    """
    run.path.mkdir(parents=True, exist_ok=True)
    record = _base_record(run, RUNNING, start_time=now(), end_time=None, returncode=None,
                          error=None, host=HOST, executor=executor, cluster=cluster,
                          job_id=job_id, code=_code_version())
    record["attempts"] += 1
    header = (f"=== attempt {record['attempts']}, {record['start_time']} on {HOST}:"
              f" {shlex.join(run.command)}\n")
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    if processes == 1:
        proc = _spawn(run, run.log, header, env)
    else:
        port = processes_lib.free_port()
        proc = processes_lib.ProcessGroup([
            _spawn(run, run.process_log(i), header, processes_lib.process_env(
                env, port=port, processes=processes, process=i)) for i in range(processes)])
        record.update(processes=processes, pids=proc.pids)
    record["pid"] = proc.pid
    _write_json(run.record_path, record)
    return proc


def _spawn(run: Run, log_path: Path, header: str, env: dict) -> subprocess.Popen:
    """Starts `run.command` in the repository root; `header`, then its output, go to log_path."""
    with open(log_path, "a") as log:
        log.write(header)
        log.flush()
        return subprocess.Popen(run.command, cwd=REPO_ROOT, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def start_task(run: Run, task: int) -> subprocess.Popen:
    """Starts task `task` > 0 of a multi-task Slurm job: process `task` of a multi-process run.

    It runs the same command as task 0 with its output in `run.process_log(task)` and
    leaves the record (launch.json) to task 0.
    """
    header = f"=== task {task}, {now()} on {HOST}: {shlex.join(run.command)}\n"
    return _spawn(run, run.process_log(task), header, dict(os.environ, PYTHONUNBUFFERED="1"))


def finish(run: Run, returncode: int, *, failed_process: int | None = None) -> str:
    """Records the end of an attempt that exited with `returncode`; returns its status.

    "done", "failed", or "interrupted" for a run that SIGINT or SIGTERM stopped (exit
    status 130 or 143 after its checkpoint, or killed by the signal before training began),
    which a rerun resumes. A run that exits 0 without writing results.json is failed.
    The log gets a last line `=== STATUS at TIME: exit code N`; `failed_process` (of a
    multi-process run, the process whose exit ended it) adds `of process I, the others
    stopped`.
    """
    record = read_record(run)
    error, status = None, DONE
    if returncode in INTERRUPTED_CODES:
        error, status = f"exit code {returncode}: {INTERRUPTED_CODES[returncode]}", INTERRUPTED
    elif returncode != 0:
        error, status = f"exit code {returncode}", FAILED
    elif not run.results.exists():
        error, status = "exit code 0 but no results.json", FAILED
    if returncode != 0 and failed_process is not None:
        error += f" of process {failed_process}, the others stopped"
    record.update(status=status, returncode=returncode, end_time=now(), error=error)
    with open(run.log, "a") as log:
        log.write(f"=== {status} at {record['end_time']}: {error or 'exit code 0'}\n")
    _write_json(run.record_path, record)
    return status


def mark_interrupted(run: Run, proc: subprocess.Popen) -> None:
    """Records that the launcher stopped `run`'s process (e.g. on Ctrl-C)."""
    record = read_record(run)
    record.update(status=INTERRUPTED, returncode=proc.returncode, end_time=now(),
                  error="stopped by the launcher")
    _write_json(run.record_path, record)
    with open(run.log, "a") as log:
        log.write(f"=== interrupted at {record['end_time']}: stopped by the launcher\n")


def mark_requeued(run: Run) -> None:
    """Records that `run`'s Slurm job is being requeued after it stopped the run (queued)."""
    record = read_record(run)
    record.update(status="submitted", error="requeued after Slurm's warning signal")
    _write_json(run.record_path, record)


def mark_submitted(run: Run) -> None:
    """Records that `run` is being submitted to Slurm (before its job exists)."""
    run.path.mkdir(parents=True, exist_ok=True)
    run.submission_path.unlink(missing_ok=True)
    _write_json(run.record_path, _base_record(run, "submitted", submit_time=now(), host=HOST,
                                              executor="slurm"))


def mark_submission_failed(run: Run, message: str) -> None:
    """Records that submitting `run` failed (it was not queued; a rerun submits it again)."""
    record = read_record(run)
    record.update(status=INTERRUPTED, error=f"submission failed: {message}")
    _write_json(run.record_path, record)


def record_submission(run: Run, *, cluster: str, job_id: str, folder: str) -> None:
    """Records the job that will run `run` (submitted.json).

    On submitit's local cluster the job id is the pid of the job's controller process,
    whose command line names submitit's `folder`.
    """
    _write_json(run.submission_path, {"cluster": cluster, "job_id": job_id, "folder": folder,
                                      "host": HOST, "submit_time": now()})


@dataclasses.dataclass(frozen=True)
class State:
    """A run's state (one of `STATES`) and a detail for listings (exit code, pid, job)."""

    status: str
    detail: str = ""


def state(run: Run) -> State:
    """The state of `run`, from its files and, for live ones, its process or Slurm job."""
    if run.results.exists():
        return State(DONE)
    record = read_record(run)
    if record is None:
        return State(PENDING)
    status = record["status"]
    if status == FAILED:
        return State(FAILED, record.get("error") or "")
    if status == RUNNING:
        return _running_state(run, record)
    if status == "submitted":
        return _submitted_state(run)
    return State(INTERRUPTED, record.get("error") or f"last recorded status {status!r}")


def _running_state(run: Run, record: dict) -> State:
    where = f"pid {record['pid']} on {record['host']}"
    if record.get("job_id"):
        where += f", job {record['job_id']}"
    if record["host"] == HOST:
        alive = any(_pid_alive(pid, run.workdir) for pid in record.get("pids", [record["pid"]]))
    elif record.get("cluster") == "slurm":
        alive = _slurm_job_active(record["job_id"])
    else:
        alive = None
    if alive is False:
        return State(INTERRUPTED, f"{where} is gone")
    return State(RUNNING, where + (" (unverified)" if alive is None else ""))


def _submitted_state(run: Run) -> State:
    submission = read_json(run.submission_path)
    if submission is None:
        return State(INTERRUPTED, "its submission did not complete")
    job = f"job {submission['job_id']}"
    if submission["cluster"] == "slurm":
        alive = _slurm_job_active(submission["job_id"])
    elif submission["host"] == HOST:
        alive = _pid_alive(int(submission["job_id"]), submission["folder"])
    else:
        alive = None
    if alive is False:
        return State(INTERRUPTED, f"{job} ended before the run started")
    return State(QUEUED, job + (" (unverified)" if alive is None else ""))


def _pid_alive(pid: int, marker: str) -> bool:
    """Whether process `pid` exists and (where /proc shows it) its command line has `marker`.

    The marker guards against a reused pid; a zombie has an empty command line.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return True
    return marker in cmdline


def _slurm_job_active(job_id: str) -> bool | None:
    """Whether Slurm still lists the job (pending or running); None without `squeue`."""
    try:
        out = subprocess.run(["squeue", "--noheader", "--format=%T", f"--jobs={job_id}"],
                             capture_output=True, text=True, timeout=60, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return False if "Invalid job id" in out.stderr else None
    return bool(out.stdout.strip())
