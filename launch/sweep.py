"""Runs a sweep: every run in its own workdir under --root, on local processes or Slurm.

  python -m launch.sweep --sweep=smoke --root=runs/smoke --parallel=2
  python -m launch.sweep --sweep=smoke --root=runs/smoke --status
  python -m launch.sweep --sweep=smoke --root=runs/smoke --retry_failed
  python -m launch.sweep --sweep=smoke --root=runs/smoke --dry_run
  python -m launch.sweep --sweep=compare_training --root=runs/compare --executor=slurm \
      --partition=gpu --time_min=120 --gpus=1 --cpus=8 --parallel=16 [--wait]
  python -m launch.sweep --sweep=smoke --root=runs/smoke --processes=2      # 2 processes a run
  python -m launch.sweep --sweep=SWEEP --root=ROOT --executor=slurm --nodes=2 \
      --tasks_per_node=4 --gpus=4                                    # 8 GPUs, 8 processes a run
  python -m launch.collect --root=runs/smoke

--sweep is a name in `launch.sweeps.SWEEPS` (each listed with a line under --sweep
below) or FILE.py:NAME, a `launch.sweeps.Sweep` defined in a file. Config overrides
given as --config.FIELD=VALUE go to every run and are part of its name (its identity):
a trial with --config.eval_examples=100 is never taken for the full run. Run
ROOT/NAME is `python -m experiments.main --config=CONFIG --workdir=ROOT/NAME
--config.FIELD=VALUE ...` started in the repository root, with its output in
ROOT/NAME/log.txt and its record in ROOT/NAME/launch.json (command, status, return
code, start/end times, host, pid, attempts); see `launch.runs` for the states.

Executors:
  local   subprocesses, --parallel (default 1) at a time; returns when all have ended.
  slurm   one job array through submitit (sbatch scripts and job logs in ROOT/.submitit),
          --parallel array jobs at once (default: all); each job runs the same subprocess.
          Returns after submitting, or with --wait when the jobs have ended.
          --submitit_cluster=local runs the jobs through submitit's local executor instead.

Rerunning the same command is safe: done runs (results.json) are skipped, running or
queued ones are left alone, interrupted ones are started again (the experiment
resumes from its checkpoints) and failed ones are listed and skipped unless
--retry_failed. The command ends with the state of every run and exits 1 when any
run is failed.

One run over several processes (`vaekl.distributed`): --processes=P starts each run as
P local processes (one per GPU) joined by `jax.distributed`, and --executor=slurm
--nodes=N --tasks_per_node=G --gpus=G as one Slurm job of N * G tasks, one JAX process
per GPU; see launch/README.md.
"""

import dataclasses
import functools
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags

from launch import executors, sweeps
from launch import runs as runs_lib

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The flags of the command line (defined by it only, so the module imports freely)."""
    flags.DEFINE_string("sweep", None, "A sweep of launch.sweeps.SWEEPS, or FILE.py:NAME: "
                        + "; ".join(f"{name} ({s.description or s.config})"
                                    for name, s in sweeps.SWEEPS.items()) + ".")
    flags.DEFINE_string("root", None, "Directory holding one workdir per run.")
    flags.DEFINE_enum("executor", "local", ["local", "slurm"], "Where the runs run.")
    flags.DEFINE_integer("parallel", None, "Runs at once (local: default 1; slurm: array "
                         "parallelism, default all).")
    flags.DEFINE_bool("retry_failed", False, "Start failed runs again.")
    flags.DEFINE_bool("status", False, "List the state of every run and exit.")
    flags.DEFINE_bool("dry_run", False, "List what would be started, with commands, and exit.")
    flags.DEFINE_string("partition", None, "slurm: the partition (default: the cluster's).")
    flags.DEFINE_integer("time_min", None, "slurm: time limit per run in minutes (default 60).")
    flags.DEFINE_integer("gpus", None, "slurm: GPUs per node (default 0).")
    flags.DEFINE_integer("cpus", None, "slurm: CPUs per task (default: the cluster's).")
    flags.DEFINE_bool("wait", False, "slurm: wait for the jobs to end, then list the states.")
    flags.DEFINE_enum("submitit_cluster", "slurm", ["slurm", "local"],
                      "slurm: submitit's cluster; local runs the jobs as local processes.")
    flags.DEFINE_integer("processes", None, "local: JAX processes per run, joined by "
                         "jax.distributed (default 1).")
    flags.DEFINE_integer("nodes", None, "slurm: nodes per run (default 1).")
    flags.DEFINE_integer("tasks_per_node", None, "slurm: JAX processes per node, one per GPU "
                         "(default 1).")
    flags.DEFINE_string("data_dir", None, "The tfds data folder of every run (sets TFDS_DATA_DIR"
                        " in their environment; not part of a run's identity). Default: the"
                        " environment's TFDS_DATA_DIR, else ~/tensorflow_datasets.")
    flags.DEFINE_bool("commit", False, "local: `git commit` each run's directory as the run"
                      " ends done (its files that .gitignore keeps out, e.g. checkpoints, stay"
                      " out), so that finished runs survive on another clone.")
    flags.mark_flags_as_required(["sweep", "root"])


_SLURM_ONLY = ("partition", "time_min", "gpus", "cpus", "wait", "submitit_cluster", "nodes",
               "tasks_per_node")
_LAUNCHED = (runs_lib.PENDING, runs_lib.INTERRUPTED)


def to_launch(runs: Sequence[runs_lib.Run], states: dict, retry_failed: bool
              ) -> list[runs_lib.Run]:
    """The runs to start: pending and interrupted ones, and failed ones if `retry_failed`."""
    wanted = _LAUNCHED + ((runs_lib.FAILED,) if retry_failed else ())
    return [r for r in runs if states[r.name].status in wanted]


def format_states(runs: Sequence[runs_lib.Run], states: dict) -> str:
    """One line of counts, then one line per run: state, name, log (or workdir), detail."""
    counts = {s: 0 for s in runs_lib.STATES}
    for r in runs:
        counts[states[r.name].status] += 1
    lines = [", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" ({len(runs)} runs)"]
    width = max(len(r.name) for r in runs)
    for status in runs_lib.STATES:
        for r in runs:
            state = states[r.name]
            if state.status == status:
                where = r.log if r.log.exists() else r.workdir
                detail = f"  ({state.detail})" if state.detail else ""
                lines.append(f"  {status:11} {r.name:{width}}  {where}{detail}")
    return "\n".join(lines)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Takes `--config.FIELD=VALUE` out of `argv`: (the other arguments, {FIELD: VALUE}).

    Raises:
      ValueError: for a `--config.FIELD` without `=VALUE`.
    """
    rest, overrides = [], {}
    for arg in argv:
        if arg.startswith("--config."):
            field, sep, value = arg[len("--config."):].partition("=")
            if not sep:
                raise ValueError(f"{arg}: expected --config.FIELD=VALUE.")
            overrides[field] = value
        else:
            rest.append(arg)
    return rest, overrides


def with_overrides(sweep: sweeps.Sweep, overrides: dict) -> sweeps.Sweep:
    """`sweep` with `overrides` added to every run: part of each run's name (its identity),
    so that a run with, say, eval_examples=100 is never taken for the full one.

    Raises:
      ValueError: when an override sets a field the sweep varies.
    """
    if not overrides:
        return sweep
    swept = sorted({f for run in sweep.runs for f in run} & set(overrides))
    if swept:
        raise ValueError(f"--config.{swept[0]}: the sweep varies {swept[0]!r} itself; override"
                         " only fields it does not sweep.")
    return dataclasses.replace(
        sweep, runs=[{**run, **overrides} for run in sweep.runs],
        fixed={k: v for k, v in sweep.fixed.items() if k not in overrides})


def commit(run: runs_lib.Run, status: str, *, sweep: str,
           repo: Path = runs_lib.REPO_ROOT) -> None:
    """`git add` and `git commit` of the run's directory in `repo` when it ended done (only
    that directory: whatever else is staged stays staged). A failing git is reported, never
    fatal: the run's files stay where they are."""
    if status != runs_lib.DONE:
        return
    where = os.path.relpath(run.workdir, repo)
    for cmd in (["git", "add", "--", where],
                ["git", "commit", "-q", "-m", f"{sweep}: run {run.name} done", "--", where]):
        out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"--commit: `{shlex.join(cmd)}` failed: {(out.stderr or out.stdout).strip()}",
                  file=sys.stderr, flush=True)
            return
    print(f"committed {where}", flush=True)


def _states(runs: Sequence[runs_lib.Run]) -> dict:
    return {r.name: runs_lib.state(r) for r in runs}


def _usage_error(message: str) -> None:
    print(f"launch.sweep: {message}", file=sys.stderr)
    sys.exit(2)


def _check_flags() -> None:
    if FLAGS.parallel is not None and FLAGS.parallel < 1:
        _usage_error(f"--parallel: expected a positive integer, got {FLAGS.parallel}.")
    for name, low in (("time_min", 1), ("gpus", 0), ("cpus", 1)):
        value = FLAGS[name].value
        if value is not None and value < low:
            _usage_error(f"--{name}: expected an integer >= {low}, got {value}.")
    if FLAGS.executor == "local":
        given = [f"--{f}" for f in _SLURM_ONLY if FLAGS[f].present]
        if given:
            _usage_error(f"{', '.join(given)}: only used with --executor=slurm.")
    elif FLAGS.commit:
        _usage_error("--commit: only used with --executor=local.")
    if FLAGS.data_dir is not None and not Path(FLAGS.data_dir).expanduser().is_dir():
        _usage_error(f"--data_dir: {FLAGS.data_dir!r} is not a directory; prepare the data"
                     " there first (`python -m vaekl.prepare`, README's Data section).")
    _check_processes()


def _check_processes() -> None:
    """--processes (local) and --nodes, --tasks_per_node (slurm): one JAX process per GPU."""
    for name in ("processes", "nodes", "tasks_per_node"):
        value = FLAGS[name].value
        if value is not None and value < 1:
            _usage_error(f"--{name}: expected an integer >= 1, got {value}.")
    if FLAGS.executor == "slurm" and FLAGS["processes"].present:
        _usage_error("--processes: only used with --executor=local (on Slurm: --nodes,"
                     " --tasks_per_node).")
    tasks = FLAGS.tasks_per_node or 1
    if (FLAGS.nodes or 1) * tasks == 1:
        return
    if FLAGS.submitit_cluster == "local":
        _usage_error("--nodes, --tasks_per_node: need a Slurm cluster; on one machine use"
                     " --executor=local --processes=P.")
    if FLAGS.gpus and FLAGS.gpus != tasks:
        _usage_error(f"--gpus: a multi-process run has one JAX process per GPU; expected"
                     f" --gpus={tasks} (= --tasks_per_node) or none, got {FLAGS.gpus}.")


def _submit(runs: Sequence[runs_lib.Run], root: Path, sweep_name: str) -> None:
    jobs = executors.submit_slurm(
        runs, root / ".submitit", cluster=FLAGS.submitit_cluster, partition=FLAGS.partition,
        time_min=FLAGS.time_min or 60, gpus=FLAGS.gpus or 0, cpus=FLAGS.cpus,
        parallel=FLAGS.parallel, name=Path(sweep_name).name, nodes=FLAGS.nodes or 1,
        tasks_per_node=FLAGS.tasks_per_node or 1)
    for run, job in zip(runs, jobs):
        print(f"submitted {run.name}: job {job.job_id}", flush=True)
    if FLAGS.wait:
        for job in jobs:
            job.wait()


def main(argv):
    if len(argv) > 1:
        _usage_error(f"unexpected arguments {argv[1:]}.")
    _check_flags()
    root = Path(FLAGS.root)
    try:
        sweep = with_overrides(sweeps.get(FLAGS.sweep), _OVERRIDES)
        runs = runs_lib.from_sweep(sweep, root)
        for run in runs:
            runs_lib.check_matches(run)
    except ValueError as e:
        _usage_error(str(e))
    states = _states(runs)
    header = f"sweep {FLAGS.sweep}: {sweep.config} under {root.resolve()}"
    if FLAGS.status:
        print(f"{header}\n{format_states(runs, states)}")
        return
    launch = to_launch(runs, states, FLAGS.retry_failed)
    if FLAGS.dry_run:
        print(f"{header}\n{format_states(runs, states)}\nwould start {len(launch)}:")
        for run in launch:
            print(f"  {shlex.join(run.command)}")
        return
    print(f"{header}: starting {len(launch)} of {len(runs)} runs", flush=True)
    if FLAGS.data_dir is not None:  # Inherited by every run, local or on Slurm.
        os.environ["TFDS_DATA_DIR"] = str(Path(FLAGS.data_dir).expanduser().resolve())
    if launch and FLAGS.executor == "local":
        try:
            executors.run_local(launch, FLAGS.parallel or 1, processes=FLAGS.processes or 1,
                                on_end=functools.partial(commit, sweep=FLAGS.sweep)
                                if FLAGS.commit else None)
        except KeyboardInterrupt:
            print("interrupted: the running runs were stopped; the same command resumes them.",
                  file=sys.stderr)
            sys.exit(130)
    elif launch:
        try:
            _submit(launch, root.resolve(), FLAGS.sweep)
        except ValueError as e:
            _usage_error(str(e))
        except RuntimeError as e:
            print(f"launch.sweep: {e}", file=sys.stderr)
            sys.exit(1)
    states = _states(runs)
    print(format_states(runs, states))
    failed = sum(s.status == runs_lib.FAILED for s in states.values())
    if failed:
        if not FLAGS.retry_failed:
            print(f"{failed} failed run(s) are not started again by a plain rerun: fix the cause"
                  " (see each log above), then rerun with --retry_failed.", file=sys.stderr)
        sys.exit(1)


_OVERRIDES: dict[str, str] = {}  # --config.FIELD=VALUE of the command line.

if __name__ == "__main__":
    _define_flags()
    try:
        _ARGV, _OVERRIDES = split_overrides(sys.argv)
    except ValueError as e:
        _usage_error(str(e))
    app.run(main, argv=_ARGV)
