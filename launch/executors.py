"""Executors: a pool of local subprocesses, and Slurm job arrays through submitit.

Both run each run with `runs.start` / `runs.finish`, i.e. the same
`python -m experiments.main ...` subprocess with its output in `RUNDIR/log.txt`.
"""

import os
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

from launch import runs as runs_lib


def run_local(runs: Sequence[runs_lib.Run], parallel: int, poll_s: float = 0.2,
              processes: int = 1) -> dict[str, str]:
    """Runs `runs` as subprocesses, at most `parallel` at a time, until all have ended.

    `processes` > 1 runs each run as that many processes joined by `jax.distributed`
    (`launch.processes`); when one of them fails the others are stopped.

    A failing run does not stop the others. With `parallel` > 1 the runs share the
    machine's accelerators, so JAX's preallocation of 75% of GPU memory per process is
    turned off (XLA_PYTHON_CLIENT_PREALLOCATE=false) unless the environment sets it.
    On KeyboardInterrupt the running subprocesses are terminated and recorded as
    interrupted (a rerun resumes them).

    Returns:
      run name -> "done" or "failed".
    """
    env = dict(os.environ)
    if parallel > 1:
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    queue, active, ended = list(runs), {}, {}
    try:
        while queue or active:
            while queue and len(active) < parallel:
                run = queue.pop(0)
                active[run.name] = (run, runs_lib.start(run, env=env, processes=processes))
                print(f"started  {run.name}", flush=True)
            time.sleep(poll_s)
            for name, (run, proc) in list(active.items()):
                if proc.poll() is not None:
                    ended[name] = runs_lib.finish(run, proc)
                    del active[name]
                    print(f"{ended[name]:8} {name}", flush=True)
    except KeyboardInterrupt:
        for run, proc in active.values():
            proc.terminate()
            proc.wait()
            runs_lib.mark_interrupted(run, proc)
        raise
    return ended


def slurm_job(run: runs_lib.Run) -> str:
    """The function each Slurm job runs: one attempt of `run` (in a subprocess).

    Raises:
      RuntimeError: when the run fails, so that Slurm and submitit see a failed job.
    """
    import submitit

    cluster = os.environ.get("SUBMITIT_EXECUTOR", "slurm")
    job = submitit.JobEnvironment()
    status = runs_lib.execute(run, executor="slurm", cluster=cluster, job_id=job.job_id,
                              task=job.global_rank)
    if status != runs_lib.DONE:
        raise RuntimeError(f"run {run.name} failed; log: {run.log}")
    return status


def submit_slurm(runs: Sequence[runs_lib.Run], folder: Path, *, cluster: str = "slurm",
                 partition: str | None = None, time_min: int = 60, gpus: int = 0,
                 cpus: int | None = None, parallel: int | None = None,
                 name: str = "vaekl", nodes: int = 1, tasks_per_node: int = 1) -> list:
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
    # Jobs unpickle `launch.executors.slurm_job`, so they start in the repository root.
    setup = [f"cd {shlex.quote(str(runs_lib.REPO_ROOT))}"]
    executor.update_parameters(
        name=name, timeout_min=time_min, gpus_per_node=gpus or None, cpus_per_task=cpus,
        slurm_partition=partition, slurm_array_parallelism=parallel or len(runs),
        slurm_setup=setup, local_setup=setup, nodes=nodes, tasks_per_node=tasks_per_node,
        slurm_srun_args=["--kill-on-bad-exit=1"])
    for run in runs:
        runs_lib.mark_submitted(run)
    try:
        jobs = executor.map_array(slurm_job, runs)
    except submitit.core.utils.FailedJobError as e:
        message = str(e).strip()
        for run in runs:
            runs_lib.mark_submission_failed(run, message)
        raise RuntimeError(f"--executor=slurm: submitting failed: {message}") from None
    for run, job in zip(runs, jobs):
        runs_lib.record_submission(run, cluster=cluster, job_id=str(job.job_id),
                                   folder=str(folder))
    return jobs
