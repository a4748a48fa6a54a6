"""Tests of one run over several processes: `vaekl.distributed` and `launch.sweep --processes`.

The multi-process runs are real: 2 local CPU processes joined by `jax.distributed`
(gloo collectives), started by `launch.sweep --processes=2`, training the quick config
on `digits`. They are compared with one process of 2 (forced) CPU devices and one of 1.
Slurm is checked up to `sbatch` (a fake one that keeps the script submitit writes), and
its task environment by 2 processes that join each other from SLURM_* variables alone.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from launch import processes
from launch import runs as runs_lib
from tests.launch_test import STOPPED, fake_slurm, launch, record
from tests.train_test import assert_trees_equal, final_state
from vaekl import distributed
from vaekl.workdir import write_json

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
STOP_BOUND_S = 60  # The bound on the survivors of a killed process.
# 4 epochs of 23 steps, a checkpoint after each (by the clock: process 0 decides for all);
# the kill below lands after the first.
FIXED = {"train.num_epochs": 4, "train.checkpoint_every_secs": 0.0,
         "eval.eval_importance_samples": 0}
SWEEP_FILE = f"""\
from launch.sweeps import Sweep

quick = Sweep(config="experiments/configs/train.py:quick", runs=[{{"train.seed": 0}}],
              fixed={FIXED!r})
"""
RUN = "seed=0"
FIELDS = ("test_elbo", "test_rate", "test_distortion", "active_units")


def cpu_env(devices: int = 1) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    for name in distributed.LOCAL_VARS + distributed.SLURM_VARS:
        env.pop(name, None)
    return env


def sweep_file(directory: Path) -> Path:
    path = directory / "sweeps.py"
    path.write_text(SWEEP_FILE)
    return path


def one_process_run(workdir: Path, devices: int) -> dict:
    """The same run as `experiments.main` in one process with `devices` CPU devices."""
    args = [f"--config.{k}={v}" for k, v in {**FIXED, "train.seed": 0}.items()]
    subprocess.run([sys.executable, "-m", "experiments.main",
                    "--config=experiments/configs/train.py:quick", f"--workdir={workdir}", *args],
                   cwd=REPO, env=cpu_env(devices), check=True, capture_output=True,
                   timeout=TIMEOUT_S)
    return json.loads((workdir / "results.json").read_text())


def logged_steps(workdir: Path) -> list[tuple[int, str]]:
    return [(row["step"], row["split"]) for row in map(json.loads, (workdir / "metrics.jsonl")
                                                          .read_text().splitlines())]


def assert_close_params(a, b, **tolerance):
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The quick run as 2 local processes, uninterrupted: (sweep file, run directory)."""
    directory = tmp_path_factory.mktemp("two")
    sweeps = sweep_file(directory)
    root = directory / "root"
    result = launch(f"--sweep={sweeps}:quick", f"--root={root}", "--processes=2",
                    env=cpu_env())
    assert result.returncode == 0, result.stdout + result.stderr
    return sweeps, root / RUN


@pytest.fixture(scope="module")
def one_device(tmp_path_factory) -> Path:
    """The same run in one process of one CPU device: its workdir."""
    workdir = tmp_path_factory.mktemp("one") / "devices1"
    one_process_run(workdir, 1)
    return workdir


# --- The environment ---------------------------------------------------------------------

def test_the_environment_says_how_many_processes():
    assert distributed.initialize_args({}) is None
    local = {"VAEKL_COORDINATOR": "127.0.0.1:1234", "VAEKL_NUM_PROCESSES": "2",
             "VAEKL_PROCESS_ID": "1"}
    args = distributed.initialize_args(local)
    assert args == dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1,
                        cluster_detection_method="deactivate", **distributed.TIMEOUTS)
    assert distributed.initialize_args(dict(local, VAEKL_NUM_PROCESSES="1",
                                            VAEKL_PROCESS_ID="0")) is None
    # Task 5 of a job of 2 nodes x 4 tasks: JAX's Slurm detection takes it from there.
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[017-018]", "SLURM_NTASKS": "8",
             "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    assert distributed.initialize_args(slurm) == dict(cluster_detection_method="slurm",
                                                      **distributed.TIMEOUTS)
    assert distributed.initialize_args(dict(slurm, SLURM_NTASKS="1")) is None  # one task
    step_less = {k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"}
    assert distributed.initialize_args(step_less) is None  # not started by srun
    # The launcher's variables win inside a Slurm allocation.
    assert distributed.initialize_args({**slurm, **local})["process_id"] == 1


@pytest.mark.parametrize("environ, message", [
    ({"VAEKL_COORDINATOR": "127.0.0.1:1", "VAEKL_NUM_PROCESSES": "2"}, "VAEKL_PROCESS_ID: set"),
    ({"VAEKL_COORDINATOR": "h:1", "VAEKL_NUM_PROCESSES": "two", "VAEKL_PROCESS_ID": "0"},
     "VAEKL_NUM_PROCESSES: expected an integer >= 1, got 'two'"),
    ({"VAEKL_COORDINATOR": "h:1", "VAEKL_NUM_PROCESSES": "2", "VAEKL_PROCESS_ID": "2"},
     "VAEKL_PROCESS_ID: expected < VAEKL_NUM_PROCESSES = 2"),
])
def test_bad_launcher_variables_are_named(environ, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize_args(environ)


JOIN = """\
import jax, jax.numpy as jnp, numpy as np
from vaekl import distributed
assert distributed.initialize()
total = jax.jit(lambda x: jnp.sum(x), out_shardings=distributed.replicated(
    distributed.data_mesh()))(distributed.shard_batch(np.array([1.0, 2.0]),
                                                      distributed.data_mesh()))
first = distributed.agree(jax.process_index() == 0)  # process 0's answer, everywhere
# Process 1's signal (process 0 has none) reaches both; no signal anywhere stays none.
signum = distributed.shared_signal(15 if jax.process_index() == 1 else None)
print(jax.process_index(), jax.process_count(), jax.device_count(), float(total), first,
      signum, distributed.shared_signal(None))
"""


def test_slurm_tasks_join_from_their_environment_alone():
    """2 tasks of a 2-node job step, as srun starts them (nodes as named by Slurm)."""
    port = processes.free_port()
    env = dict(cpu_env(), SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost,gpu018",
               SLURM_NTASKS="2", SLURM_LOCALID="0", JAX_COORDINATOR_PORT=str(port))
    procs = [subprocess.Popen([sys.executable, "-c", JOIN], cwd=REPO, text=True,
                              env=dict(env, SLURM_PROCID=str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    # Each is its own rank of 2, sees 2 devices, the sum spans both and they agree.
    assert [out.splitlines()[-1] for out, _ in outs] == ["0 2 2 3.0 True 15 None",
                                                         "1 2 2 3.0 True 15 None"]


LOOP = """\
import time, jax, jax.numpy as jnp, numpy as np
from vaekl import distributed
assert distributed.initialize()
mesh = distributed.data_mesh()
total = jax.jit(jnp.sum, out_shardings=distributed.replicated(mesh))
x = distributed.shard_batch(np.ones(2, np.float32), mesh)
print("joined", flush=True)
while True:
    total(x).block_until_ready()
    time.sleep(0.01)
"""


@pytest.fixture
def looping_pair():
    """2 processes joined by `jax.distributed`, each all-reducing in a loop forever."""
    port = processes.free_port()
    procs = [subprocess.Popen([sys.executable, "-c", LOOP], cwd=REPO, text=True,
                              env=processes.process_env(cpu_env(), port=port, processes=2,
                                                        process=i),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    try:
        for p in procs:
            while (line := p.stdout.readline()) != "joined\n":
                assert line, "a process ended before joining"
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_the_survivor_of_a_lost_coordinator_ends_by_itself(looping_pair):
    """No launcher to stop it (as on Slurm without --kill-on-bad-exit): JAX's own bound."""
    looping_pair[0].kill()  # Process 0 holds the coordination service.
    looping_pair[1].communicate(timeout=STOP_BOUND_S)
    assert looping_pair[1].returncode != 0  # It failed: the loop never ends on its own.


def test_sigterm_ends_a_process_of_several_as_it_ends_one(looping_pair):
    """JAX's preemption service, which would swallow SIGTERM, is off (`initialize`)."""
    looping_pair[1].send_signal(signal.SIGTERM)
    looping_pair[1].communicate(timeout=STOP_BOUND_S)
    assert looping_pair[1].returncode == -signal.SIGTERM


# --- Training over 2 processes ---------------------------------------------------------

def test_two_processes_train_as_one_process_of_two_devices_and_of_one(two_processes,
                                                                      one_device, tmp_path):
    _, workdir = two_processes
    rec = record(workdir.parent, RUN)
    assert rec["status"] == "done" and rec["processes"] == 2 and len(rec["pids"]) == 2
    assert (workdir / "log.process1.txt").exists()
    two = json.loads((workdir / "results.json").read_text())
    assert (two["processes"], two["devices"]) == (2, 2)
    for name in ("metrics.jsonl", "reconstructions.png", "samples.png"):
        assert (workdir / name).exists(), name
    devices2 = one_process_run(tmp_path / "devices2", 2)
    devices1 = json.loads((one_device / "results.json").read_text())
    assert (devices2["processes"], devices2["devices"], devices1["devices"]) == (1, 2, 1)
    one_state = final_state(one_device)
    for other, path in ((two, workdir), (devices2, tmp_path / "devices2")):
        for field in FIELDS:
            assert other[field] == pytest.approx(devices1[field], rel=1e-4, abs=1e-4), field
        # Restored onto this process's one device: the template carries the sharding.
        assert_close_params(final_state(path, template=one_state), one_state,
                            rtol=1e-4, atol=1e-5)
    # Each metrics line written once (by process 0 alone), as one process writes them.
    assert logged_steps(workdir) == logged_steps(one_device)


@pytest.mark.slow  # About a minute: in CI's slow pass.
def test_a_killed_process_stops_the_run_and_a_rerun_resumes_it(two_processes, one_device,
                                                               tmp_path):
    sweeps, uninterrupted = two_processes
    root = tmp_path / "root"
    args = (f"--sweep={sweeps}:quick", f"--root={root}", "--processes=2")
    launcher = subprocess.Popen([sys.executable, "-m", "launch.sweep", *args], cwd=REPO,
                                env=cpu_env(), text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    first = root / RUN / "checkpoints" / "23"  # orbax renames it into place when complete
    deadline = time.monotonic() + TIMEOUT_S
    while not first.exists():
        assert time.monotonic() < deadline and launcher.poll() is None, launcher.stdout.read()
        time.sleep(0.05)
    pids = record(root, RUN)["pids"]
    os.kill(pids[1], signal.SIGKILL)
    out, _ = launcher.communicate(timeout=STOP_BOUND_S)  # Both processes ended, and it.
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert launcher.returncode == 1, out
    assert "exit code -9 of process 1, the others stopped" in out
    rec = record(root, RUN)
    assert rec["status"] == "failed" and rec["returncode"] == -9
    assert not (root / RUN / "results.json").exists()

    rerun = launch(*args, "--retry_failed", env=cpu_env())
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert record(root, RUN)["attempts"] == 2
    log = (root / RUN / "log.txt").read_text()
    resumed_at = int(log.split("Resumed from the checkpoint at step ")[1].split(".")[0])
    assert 23 <= resumed_at < 4 * 23
    template = final_state(one_device)  # Both restored onto this process's one device.
    assert_trees_equal(final_state(root / RUN, template), final_state(uninterrupted, template))
    results = json.loads((root / RUN / "results.json").read_text())
    expected = json.loads((uninterrupted / "results.json").read_text())
    assert {f: results[f] for f in FIELDS} == {f: expected[f] for f in FIELDS}


def test_a_signal_to_one_process_stops_all_after_the_same_epoch(two_processes, tmp_path):
    """SIGTERM to process 1 alone: both checkpoint the same step and stop (interrupted)."""
    sweeps, _ = two_processes
    root = tmp_path / "root"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch.sweep", f"--sweep={sweeps}:quick", f"--root={root}",
         "--processes=2"], cwd=REPO, env=cpu_env(), text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    first = root / RUN / "checkpoints" / "23"
    deadline = time.monotonic() + TIMEOUT_S
    while not first.exists():
        assert time.monotonic() < deadline and launcher.poll() is None, launcher.stdout.read()
        time.sleep(0.05)
    os.kill(record(root, RUN)["pids"][1], signal.SIGTERM)
    out, _ = launcher.communicate(timeout=TIMEOUT_S)
    assert launcher.returncode == 0 and "1 interrupted (1 runs)" in out, out
    rec = record(root, RUN)
    assert rec["status"] == "interrupted" and rec["returncode"] == 143, rec
    # The one that exits second may be stopped by the group before its last line.
    logs = [(root / RUN / name).read_text() for name in ("log.txt", "log.process1.txt")]
    stopped = {int(step) for log in logs for step in STOPPED.findall(log)}
    assert len(stopped) == 1, logs
    step, = stopped
    assert 23 <= step < 4 * 23 and (root / RUN / "checkpoints" / str(step)).exists()
    assert not (root / RUN / "results.json").exists()


# --- The launcher's pieces -------------------------------------------------------------

def test_a_failing_process_stops_its_siblings():
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    group = processes.ProcessGroup([
        subprocess.Popen(sleeper), subprocess.Popen([sys.executable, "-c", "exit(3)"])])
    assert group.wait() == 3 and group.failed_process == 1
    assert group._procs[0].poll() == -signal.SIGTERM


def test_each_local_process_gets_its_rank_and_gpu():
    env = processes.process_env({"PATH": "/bin"}, port=5, processes=4, process=2)
    assert env == {"PATH": "/bin", "VAEKL_COORDINATOR": "127.0.0.1:5",
                   "VAEKL_NUM_PROCESSES": "4", "VAEKL_PROCESS_ID": "2",
                   "JAX_LOCAL_DEVICE_IDS": "2"}
    chosen = processes.process_env({"JAX_LOCAL_DEVICE_IDS": "0"}, port=5, processes=4,
                                   process=2)
    assert chosen["JAX_LOCAL_DEVICE_IDS"] == "0"  # Set by the user: all on GPU 0.


def test_other_slurm_tasks_log_apart_and_leave_the_record(tmp_path, monkeypatch):
    import submitit

    from launch import executors

    class Task3:  # What submitit.JobEnvironment says in task 3 of job 7.
        global_rank, job_id = 3, "7"

    monkeypatch.setattr(submitit, "JobEnvironment", Task3)
    run = runs_lib.Run(name="r", workdir=str(tmp_path / "r"),
                       config="experiments/configs/train.py", overrides={"no_such_field": 1},
                       fixed={})
    run.path.mkdir()
    with pytest.raises(RuntimeError, match=r"task 3 failed with exit code 1; log: .*"
                                           r"log\.process3\.txt"):
        executors.SlurmJob()(run)
    assert not run.record_path.exists() and not run.log.exists()
    log = run.process_log(3).read_text()
    assert log.startswith("=== task 3, ") and "no_such_field" in log
    # A task whose process stopped with task 0's (Slurm's warning signal) exits 0, so that
    # srun --kill-on-bad-exit leaves task 0 to requeue the job.
    for returncode in (143, -signal.SIGTERM):
        assert executors._task_status(run, 3, returncode) == runs_lib.INTERRUPTED


def test_the_record_names_the_process_that_ended_a_group(tmp_path):
    run = runs_lib.Run(name="r", workdir=str(tmp_path / "r"),
                       config="experiments/configs/train.py", overrides={}, fixed={})
    run.path.mkdir()
    write_json(run.record_path, {"status": "running", "attempts": 1})
    assert runs_lib.finish(run, 130, failed_process=0) == runs_lib.INTERRUPTED
    assert runs_lib.finish(run, -9, failed_process=1) == runs_lib.FAILED
    log = run.log.read_text()
    assert "=== interrupted at " in log and "exit code 130: SIGINT of process 0, the others" in log
    assert record(tmp_path, "r")["error"] == "exit code -9 of process 1, the others stopped"


def test_slurm_script_for_two_nodes_of_four_gpus(tmp_path):
    args = ("--sweep=estimators_smoke", f"--root={tmp_path / 'root'}", "--executor=slurm",
            "--nodes=2", "--tasks_per_node=4", "--gpus=4")
    result = launch(*args, env=fake_slurm(tmp_path, "PENDING\\n"))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = (tmp_path / "script.sh").read_text().splitlines()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4"):
        assert line in lines, (line, lines)
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and "-m submitit.core._submit" in srun


@pytest.mark.parametrize("flags, message", [
    (("--executor=slurm", "--nodes=2", "--tasks_per_node=4", "--gpus=8"),
     "--gpus: a multi-process run has one JAX process per GPU; expected --gpus=4"),
    (("--executor=slurm", "--processes=2"), "--processes: only used with --executor=local"),
    (("--nodes=2",), "--nodes: only used with --executor=slurm"),
    (("--processes=0",), "--processes: expected an integer >= 1, got 0"),
    (("--executor=slurm", "--submitit_cluster=local", "--tasks_per_node=2"),
     "--nodes, --tasks_per_node: need a Slurm cluster"),
])
def test_process_flags_are_checked(tmp_path, flags, message):
    result = launch("--sweep=estimators_smoke", f"--root={tmp_path}", *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr
