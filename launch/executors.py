"""Executors: a pool of local subprocesses, and Slurm job arrays through submitit.

Both run each run with `runs.start` / `runs.finish`, i.e. the same
`python -m experiments.main ...` subprocess with its output in `RUNDIR/log.txt`.
"""

import os
import shlex
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from launch import runs as runs_lib


def run_local(runs: Sequence[runs_lib.Run], parallel: int, poll_s: float = 0.2,
              processes: int = 1,
              on_end: Callable[[runs_lib.Run, str], None] | None = None) -> dict[str, str]:
    """Runs `runs` as subprocesses, at most `parallel` at a time, until all have ended.

    `processes` > 1 runs each run as that many processes joined by `jax.distributed`
    (`launch.processes`); when one of them fails the others are stopped.

    A failing run does not stop the others. With `parallel` > 1 the runs share the
    machine's accelerators, so JAX's preallocation of 75% of GPU memory per process is
    turned off (XLA_PYTHON_CLIENT_PREALLOCATE=false) unless the environment sets it.
    Progress (runs done, running, left) is logged at most once a minute. On
    KeyboardInterrupt the running subprocesses are terminated (a training run first
    checkpoints) and recorded as interrupted (a rerun resumes them). `on_end(run, status)`,
    if given, is called as each run ends (the sweep's `--commit`).

    Returns:
      run name -> "done", "failed" or "interrupted" (a run stopped by a signal).
    """
    from vaekl import progress as progress_lib

    env = dict(os.environ)
    if parallel > 1:
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    queue, active, ended = list(runs), {}, {}
    progress = progress_lib.Progress("sweep", len(runs), unit="runs", every_s=60.0,
                                     first_is_warmup=False)
    try:
        while queue or active:
            while queue and len(active) < parallel:
                run = queue.pop(0)
                active[run.name] = (run, runs_lib.start(run, env=env, processes=processes))
                print(f"started  {run.name}", flush=True)
            time.sleep(poll_s)
            finished = 0
            for name, (run, proc) in list(active.items()):
                if proc.poll() is not None:
                    failed = getattr(proc, "failed_process", None)  # Of a ProcessGroup.
                    ended[name] = runs_lib.finish(run, proc.returncode, failed_process=failed)
                    del active[name]
                    finished += 1
                    print(f"{ended[name]:8} {name}", flush=True)
                    if on_end is not None:
                        on_end(run, ended[name])
            progress.advance(finished, running=len(active), left=len(queue))
    except KeyboardInterrupt:
        for run, proc in active.values():
            proc.terminate()
            proc.wait()
            runs_lib.mark_interrupted(run, proc)
        raise
    return ended


class SlurmJob:
    """What each Slurm job runs: one attempt of a run, in a subprocess.

    Slurm sends its warning signal (USR2, `signal_delay_s` before the time limit) to
    every process of the job. The run's subprocess ignores it; submitit's handler in the
    job calls `checkpoint`, which sends the run SIGTERM, waits until it has written its
    checkpoint and exited, and hands submitit the same call to requeue: the requeued job
    resumes the run.
    """

    def __init__(self):
        self._proc = None

    def __call__(self, run: runs_lib.Run) -> str:
        """Runs `run` to its end; returns "done" (in a task > 0, "done" or "interrupted").

        In a job of several tasks (`--nodes`, `--tasks_per_node`) task i runs process i
        of the multi-process run; task 0 alone keeps the record and is requeued, the
        others log to `run.process_log(i)` (`runs.start_task`).

        Raises:
          RuntimeError: when the run fails or (task 0) is interrupted, so that Slurm and
            submitit see an unfinished job.
        """
        import submitit

        job = submitit.JobEnvironment()
        cluster = os.environ.get("SUBMITIT_EXECUTOR", "slurm")
        previous = signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # Inherited by the run.
        try:
            self._proc = (runs_lib.start_task(run, job.global_rank) if job.global_rank else
                          runs_lib.start(run, executor="slurm", cluster=cluster,
                                         job_id=job.job_id))
        finally:
            signal.signal(signal.SIGUSR2, previous)
        self._proc.wait()
        if job.global_rank:
            return _task_status(run, job.global_rank, self._proc.returncode)
        status = runs_lib.finish(run, self._proc.returncode)
        if status != runs_lib.DONE:
            raise RuntimeError(f"run {run.name} {status}; log: {run.log}")
        return status

    def checkpoint(self, run: runs_lib.Run):
        """On the warning signal: stops the run with a checkpoint; returns the call to requeue.

        Runs as a signal handler (of task 0 only: submitit ignores the signal in the
        others), possibly inside `Popen.wait` of `__call__`, whose lock it must not take:
        it waits for the exit with `os.waitid` and leaves the process to be reaped there.
        In a multi-process run process 0 shares the signal with the others
        (`vaekl.distributed.shared_signal`), so all of them stop after the same epoch.
        """
        from submitit.helpers import DelayedSubmission

        proc = self._proc
        if proc is not None:
            returncode = proc.returncode
            if returncode is None:
                os.kill(proc.pid, signal.SIGTERM)
                returncode = _exit_status(os.waitid(os.P_PID, proc.pid,
                                                    os.WEXITED | os.WNOWAIT))
            if runs_lib.finish(run, returncode) == runs_lib.DONE:
                return None  # It finished meanwhile: nothing to requeue.
            runs_lib.mark_requeued(run)
        return DelayedSubmission(SlurmJob(), run)


def _task_status(run: runs_lib.Run, task: int, returncode: int) -> str:
    """The outcome of task `task` > 0, whose process exited with `returncode`.

    An interrupted process (stopped with task 0's, after their common checkpoint) is
    not a failure: the task exits 0, so that srun's --kill-on-bad-exit leaves task 0 to
    record the run and requeue the job.

    Raises:
      RuntimeError: when the process failed (srun then ends the other tasks).
    """
    if returncode == 0:
        return runs_lib.DONE
    if returncode in runs_lib.INTERRUPTED_CODES:
        return runs_lib.INTERRUPTED
    raise RuntimeError(f"run {run.name}: task {task} failed with exit code {returncode};"
                       f" log: {run.process_log(task)}")


def _exit_status(info) -> int:
    """A `waitid` result as a Popen return code: the exit status, or -signal if killed."""
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def submit_slurm(runs: Sequence[runs_lib.Run], folder: Path, *, cluster: str = "slurm",
                 partition: str | None = None, time_min: int = 60, gpus: int = 0,
                 cpus: int | None = None, parallel: int | None = None,
                 name: str = "vaekl", signal_delay_s: int = 120, nodes: int = 1,
                 tasks_per_node: int = 1) -> list:
    """Submits `runs` as one job array (one job per run) through submitit.

    Args:
      runs: the runs to submit.
      folder: submitit's folder (sbatch scripts, pickles, job logs).
      cluster: "slurm", or "local" for submitit's local executor (the same jobs as
        local processes: for tests and machines without Slurm).
      partition: the Slurm partition; None: the cluster's default.
      time_min: the time limit per job, in minutes.
      gpus: GPUs per node (0: none requested).
      cpus: CPUs per task; None: the cluster's default.
      parallel: the most array jobs running at once; None: no limit.
      name: the Slurm job name.
      signal_delay_s: how long before the time limit Slurm sends its warning signal,
        on which a run checkpoints and its job is requeued (`SlurmJob`): enough for
        an epoch and a checkpoint.
      nodes, tasks_per_node: > 1 makes each run one `jax.distributed` run of
        nodes * tasks_per_node processes (one per task: with GPUs, one per GPU). srun
        ends every task of a job when one fails (--kill-on-bad-exit).

    Returns:
      The submitit jobs, in the order of `runs`.

    Raises:
      ValueError: naming `--executor` when Slurm is not available here.
      RuntimeError: when the submission fails (e.g. sbatch rejects a partition); the
        runs are then recorded as interrupted, with the error.
    """
    import submitit

    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    except RuntimeError as e:
        raise ValueError(f"--executor=slurm: {e} (submitit's local executor runs the same jobs"
                         " as local processes: --submitit_cluster=local).") from None
    # Jobs unpickle `launch.executors.SlurmJob`, so they start in the repository root.
    setup = [f"cd {shlex.quote(str(runs_lib.REPO_ROOT))}"]
    executor.update_parameters(
        name=name, timeout_min=time_min, gpus_per_node=gpus or None, cpus_per_task=cpus,
        slurm_partition=partition, slurm_array_parallelism=parallel or len(runs),
        slurm_setup=setup, local_setup=setup, slurm_signal_delay_s=signal_delay_s,
        nodes=nodes, tasks_per_node=tasks_per_node, slurm_srun_args=["--kill-on-bad-exit=1"])
    for run in runs:
        runs_lib.mark_submitted(run)
    try:
        jobs = executor.map_array(SlurmJob(), runs)
    except submitit.core.utils.FailedJobError as e:
        message = str(e).strip()
        for run in runs:
            runs_lib.mark_submission_failed(run, message)
        raise RuntimeError(f"--executor=slurm: submitting failed: {message}") from None
    for run, job in zip(runs, jobs):
        runs_lib.record_submission(run, cluster=cluster, job_id=str(job.job_id),
                                   folder=str(folder))
    return jobs
