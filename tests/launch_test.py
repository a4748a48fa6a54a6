"""Tests of launch/: sweep expansion, the local and Slurm executors, resuming, collect.

The executors run real `python -m experiments.main` subprocesses of the estimators
experiment with 2000 draws per case (a few seconds each). A failing run is a real one
too: one draw per estimate leaves a case without a standard deviation. The Slurm
path runs through submitit's local executor (real jobs), and up to `sbatch` with fake
`sbatch`/`srun`/`squeue` executables on PATH that record what submitit hands them.
"""

import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import collect, runs, sweeps
from launch.sweeps import Sweep, chain, product, zip_
from vaekl.workdir import write_json

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300

# A test config: the estimators quick config cut to 2 estimators and to Schulman's 2 cases
# with 2000 draws each (a few seconds, mostly compiling), and the first case once more,
# which takes `num_draws`: the failing run's num_draws=1 leaves it without a standard
# deviation. The `fixed` variant drops that case, which fixes that run.
CONFIG = """\
import importlib.util

spec = importlib.util.spec_from_file_location("estimators_config", {estimators!r})
estimators = importlib.util.module_from_spec(spec)
spec.loader.exec_module(estimators)


def get_config(arg=None):
    config = estimators.get_config("quick")
    config.num_draws = config.schulman_draws = config.histogram_draws = 2000
    config.estimators = ("k1", "k3")
    config.cases = {cases}
    return config
"""

# Two good runs and one that fails until the config drops its third case.
SWEEP_FILE = """\
from launch.sweeps import Sweep, chain, product

flaky = Sweep(config={config!r},
              runs=chain(product(seed=[0, 1]), [{{"seed": 2, "num_draws": 1}}]))
failing = Sweep(config={config!r}, runs=[{{"seed": 2, "num_draws": 1}}])
pair = Sweep(config={config!r}, runs=[{{"seed": 0}}, {{"seed": 2, "num_draws": 1}}])
one = Sweep(config={config!r}, runs=[{{"seed": 0}}])
"""
FAILING_RUN = "num_draws=1,seed=2"


def write_sweep_files(directory: Path) -> tuple[Path, Path]:
    """Writes a test config and a sweep file into `directory`; returns their paths."""
    config = directory / "config.py"
    write_config(config, fixed=False)
    sweep_file = directory / "test_sweeps.py"
    sweep_file.write_text(SWEEP_FILE.format(config=str(config)))
    return config, sweep_file


def write_config(path: Path, fixed: bool) -> None:
    estimators = str(REPO / "experiments" / "configs" / "estimators.py")
    cases = "config.cases[:2]" if fixed else "config.cases[:2] + config.cases[:1]"
    path.write_text(CONFIG.format(estimators=estimators, cases=cases))


def launch(*args, env=None) -> subprocess.CompletedProcess:
    """Runs `python -m launch.sweep ARGS` in the repository root."""
    return subprocess.run([sys.executable, "-m", "launch.sweep", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def record(root: Path, name: str) -> dict:
    return json.loads((root / name / "launch.json").read_text())


# --- Sweep expansion -------------------------------------------------------------------

def test_product_zip_chain():
    assert product(kl=["k1", "k3"], seed=[0, 1]) == [
        {"kl": "k1", "seed": 0}, {"kl": "k1", "seed": 1},
        {"kl": "k3", "seed": 0}, {"kl": "k3", "seed": 1}]
    pairs = zip_(latents=[2, 50], hidden=[(50,), (400, 400)])
    assert pairs == [{"latents": 2, "hidden": (50,)}, {"latents": 50, "hidden": (400, 400)}]
    crossed = product(pairs, seed=[0, 1, 2])
    assert len(crossed) == 6 and crossed[1] == {"latents": 2, "hidden": (50,), "seed": 1}
    assert zip_(product(seed=[0, 1]), kl=["k1", "k3"]) == [
        {"seed": 0, "kl": "k1"}, {"seed": 1, "kl": "k3"}]
    assert chain(product(seed=[0]), [{"kl": "k3"}]) == [{"seed": 0}, {"kl": "k3"}]
    assert product() == [{}]


@pytest.mark.parametrize("make, message", [
    (lambda: zip_(kl=["k1", "k3"], seed=[0]), "one length"),
    (lambda: product(product(seed=[0]), seed=[1]), "set by two factors"),
    (lambda: product(kl=[]), "at least one value"),
    (lambda: Sweep("c.py", runs=[{"seed": 1}, {"seed": 1}]), "same name"),
    (lambda: Sweep("c.py", runs=[{"a/b": 1}]), "config field name"),
    (lambda: Sweep("c.py", runs=[{"seed": None}]), "expected str, int, float, bool"),
    (lambda: Sweep("c.py", runs=[{"seed": 1}], fixed={"seed": 2}), "both swept and fixed"),
])
def test_bad_sweeps_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_bare_string_is_not_a_list_of_values():
    with pytest.raises(TypeError, match="sweep field 'kl': expected a list of values"):
        product(kl="k3")


def test_run_names_are_stable_safe_and_unique():
    assert sweeps.run_name({"seed": 1, "num_samples": 5, "kl": "k3"}) == (
        "kl=k3,num_samples=5,seed=1")
    # Named by leaf names: the nested config's runs keep the flat config's names.
    assert sweeps.run_name({"train.seed": 1, "loss.num_samples": 5, "loss.kl": "k3"}) == (
        "kl=k3,num_samples=5,seed=1")
    assert sweeps.leaves({"loss": {"kl": "k3"}, "a.seed": 1, "b.seed": 2}) == {
        "kl": "k3", "a.seed": 1, "b.seed": 2}  # A shared leaf name keeps its paths.
    assert sweeps.run_name({"hidden": (200, 200), "lr": 1e-3, "path": "a/b c"}) == (
        "hidden=200_200,lr=0.001,path=a_b_c")
    assert sweeps.run_name({}) == "base"
    long = sweeps.run_name({"data_path": "x" * 500})
    assert len(long) <= 200 and long != sweeps.run_name({"data_path": "x" * 499})
    for name, sweep in sweeps.SWEEPS.items():
        names = [n for n, _ in sweep.named_runs()]
        assert len(set(names)) == len(names), name
        assert names == [n for n, _ in sweep.named_runs()], name


def test_override_values_are_written_as_config_flags_parses_them():
    assert sweeps.format_value((200, 200)) == "(200, 200)"
    assert sweeps.format_value(("k1", "k3")) == "('k1', 'k3')"
    assert sweeps.format_value(True) == "True"
    assert sweeps.format_value(1e-3) == "0.001"
    assert sweeps.format_value("k3") == "k3"


def test_registry_sweeps():
    smoke = sweeps.get("smoke")
    assert smoke.config == "experiments/configs/train.py:quick"
    assert len(smoke.runs) >= 8
    assert {r["loss.kl"] for r in smoke.runs} == {"analytic", "k1", "k3", "stl"}
    compare = sweeps.get("compare_training")
    assert len(compare.runs) == 4 * 2 * 3
    assert "kl=k3,num_samples=5,seed=1" in dict(compare.named_runs())
    assert {r["model.latents"] for r in sweeps.get("latents").runs} == {2, 5, 10, 20, 50}
    run = runs.from_sweep(smoke, Path("/r"))[0]
    assert run.command[1:] == [
        "-m", "experiments.main", "--config=experiments/configs/train.py:quick",
        "--workdir=/r/kl=analytic,seed=0", "--config.data.dataset=digits",
        "--config.loss.kl=analytic", "--config.train.seed=0"]


def test_registry_fields_exist_in_their_configs():
    for name, sweep in sweeps.SWEEPS.items():
        path, _, arg = sweep.config.partition(":")
        if not (REPO / path).exists():
            continue  # The config is still being written.
        spec = importlib.util.spec_from_file_location("cfg", REPO / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(arg or None)
        for run in sweep.runs:
            for field in {**run, **sweep.fixed}:
                node = config
                for key in field.split("."):  # A nested field: loss.kl.
                    assert key in node, f"sweep {name}: {path} has no field {field!r}"
                    node = node[key]


def test_unknown_sweep_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="--sweep: unknown sweep 'nope'; expected one of smoke,"):
        sweeps.get("nope")
    _, sweep_file = write_sweep_files(tmp_path)
    assert len(sweeps.get(f"{sweep_file}:flaky").runs) == 3
    with pytest.raises(ValueError, match=r"has no Sweep named 'nope'; it defines \['flaky'"):
        sweeps.get(f"{sweep_file}:nope")
    result = launch("--sweep=nope", f"--root={tmp_path / 'r'}")
    assert result.returncode == 2
    assert "unknown sweep 'nope'; expected one of smoke, compare_training" in result.stderr


def test_entry_points_import_together_and_define_no_flags():
    """Flags belong to the command lines: importing the modules defines none of them."""
    code = ("from absl import app, flags, logging\n"  # absl's own flags come with these.
            "before = set(flags.FLAGS)\n"
            "import experiments.main, launch.collect, launch.sweep\n"
            "print(sorted(set(flags.FLAGS) - before))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_flag_errors_name_the_flag(tmp_path):
    result = launch("--sweep=estimators_smoke", f"--root={tmp_path}", "--parallel=0")
    assert result.returncode == 2 and "--parallel: expected a positive integer" in result.stderr
    result = launch("--sweep=estimators_smoke", f"--root={tmp_path}", "--partition=gpu")
    assert result.returncode == 2 and "--partition: only used with --executor=slurm" in (
        result.stderr)


# --- Local executor --------------------------------------------------------------------

@pytest.fixture(scope="module")
def flaky_root(tmp_path_factory):
    """A local sweep of 2 good runs and 1 failing one, run 2 at a time."""
    directory = tmp_path_factory.mktemp("flaky")
    _, sweep_file = write_sweep_files(directory)
    root = directory / "root"
    result = launch(f"--sweep={sweep_file}:flaky", f"--root={root}", "--parallel=2")
    return sweep_file, root, result


def test_local_sweep_finishes_the_good_runs_and_reports_the_failing_one(flaky_root):
    _, root, result = flaky_root
    assert result.returncode == 1, result.stdout + result.stderr
    for name in ("seed=0", "seed=1"):
        assert (root / name / "results.json").exists()
        rec = record(root, name)
        assert rec["status"] == "done" and rec["returncode"] == 0 and rec["attempts"] == 1
        assert rec["host"] and rec["pid"] > 0 and rec["start_time"] <= rec["end_time"]
        assert rec["command"][1:4] == ["-m", "experiments.main", rec["command"][3]]
        assert "--config.seed=" + name[-1] in rec["command"]
    failed = record(root, FAILING_RUN)
    assert failed["status"] == "failed" and failed["returncode"] != 0
    log = root / FAILING_RUN / "log.txt"
    assert "error: a sample variance needs at least 2 draws, got 1." in log.read_text()
    assert f"failed      {FAILING_RUN}  {log}  (exit code {failed['returncode']})" in (
        result.stdout)
    assert "2 done, 1 failed (3 runs)" in result.stdout


def test_status_lists_every_run_with_its_log(flaky_root):
    sweep_file, root, _ = flaky_root
    result = launch(f"--sweep={sweep_file}:flaky", f"--root={root}", "--status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "2 done, 1 failed (3 runs)" in lines
    assert f"  done        {'seed=0':{len(FAILING_RUN)}}  {root / 'seed=0' / 'log.txt'}" in lines
    assert any(line.startswith(f"  failed      {FAILING_RUN}  {root}") for line in lines)


def test_rerun_skips_done_and_failed_runs(flaky_root):
    sweep_file, root, _ = flaky_root
    before = {n: record(root, n) for n in ("seed=0", "seed=1", FAILING_RUN)}
    result = launch(f"--sweep={sweep_file}:flaky", f"--root={root}", "--parallel=2")
    assert result.returncode == 1
    assert "starting 0 of 3 runs" in result.stdout
    assert "1 failed run(s) are not started again by a plain rerun" in result.stderr
    assert "rerun with --retry_failed" in result.stderr
    assert {n: record(root, n) for n in before} == before
    dry = launch(f"--sweep={sweep_file}:flaky", f"--root={root}", "--dry_run", "--retry_failed")
    assert dry.returncode == 0 and "would start 1:" in dry.stdout
    assert "--config.num_draws=1" in dry.stdout


def test_config_overrides_are_part_of_each_runs_name(tmp_path):
    _, sweep_file = write_sweep_files(tmp_path)
    root = tmp_path / "root"
    dry = launch(f"--sweep={sweep_file}:one", f"--root={root}", "--config.num_draws=3",
                 "--dry_run")
    assert dry.returncode == 0, dry.stderr
    assert f"--workdir={root / 'num_draws=3,seed=0'}" in dry.stdout
    assert "--config.num_draws=3" in dry.stdout
    swept = launch(f"--sweep={sweep_file}:one", f"--root={root}", "--config.seed=5")
    assert swept.returncode == 2
    assert "--config.seed: the sweep varies 'seed' itself" in swept.stderr
    bare = launch(f"--sweep={sweep_file}:one", f"--root={root}", "--config.seed")
    assert bare.returncode == 2 and "expected --config.FIELD=VALUE" in bare.stderr


def test_data_dir_reaches_every_run(tmp_path):
    data_dir = tmp_path / "empty_tfds"
    data_dir.mkdir()
    sweep_file = tmp_path / "mnist_sweep.py"
    sweep_file.write_text(
        "from launch.sweeps import Sweep\n"
        "mnist = Sweep(config='experiments/configs/train.py:quick', runs=[{'train.seed': 0}],\n"
        "              fixed={'data.dataset': 'mnist'})\n")
    root = tmp_path / "root"
    result = launch(f"--sweep={sweep_file}:mnist", f"--root={root}", f"--data_dir={data_dir}")
    assert result.returncode == 1  # mnist is not prepared there: the run says where it looked.
    log = (root / "seed=0" / "log.txt").read_text()
    assert f"is not prepared in data_dir (config.data.data_dir) {str(data_dir)!r}" in log
    missing = launch(f"--sweep={sweep_file}:mnist", f"--root={root}",
                     f"--data_dir={tmp_path / 'nope'}")
    assert missing.returncode == 2 and "--data_dir:" in missing.stderr


def test_commit_commits_a_done_runs_small_files_only(tmp_path):
    from launch import sweep as sweep_cli

    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True,  # noqa: E731
                                    check=True).stdout
    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (repo / ".gitignore").write_text((REPO / ".gitignore").read_text())
    (repo / "other.txt").write_text("staged, not part of the run")
    git("add", ".gitignore", "other.txt")
    run_dir = repo / "results" / "study" / "runs" / "kl=k1"
    (run_dir / "checkpoints" / "120").mkdir(parents=True)
    (run_dir / "checkpoints" / "120" / "state").write_text("big")
    (run_dir / "tensorboard").mkdir()
    (run_dir / "tensorboard" / "events").write_text("events")
    for name in ("results.json", "config.json", "launch.json", "metrics.jsonl"):
        (run_dir / name).write_text("{}")
    run = runs.Run(name="kl=k1", workdir=str(run_dir), config="c.py", overrides={}, fixed={})
    sweep_cli.commit(run, runs.FAILED, sweep="study", repo=repo)  # Only a done run.
    assert "kl=k1" not in git("log", "--all", "--name-only", "--format=")
    sweep_cli.commit(run, runs.DONE, sweep="study", repo=repo)
    assert git("log", "-1", "--format=%s") == "study: run kl=k1 done\n"
    files = git("show", "--name-only", "--format=", "HEAD").split()
    assert sorted(files) == [f"results/study/runs/kl=k1/{name}" for name in (
        "config.json", "launch.json", "metrics.jsonl", "results.json")]
    assert "A  other.txt" in git("status", "--short")  # Left staged, not committed.


def test_failed_run_is_retried_only_with_retry_failed(tmp_path):
    config, sweep_file = write_sweep_files(tmp_path)
    root = tmp_path / "root"
    args = (f"--sweep={sweep_file}:failing", f"--root={root}")
    assert launch(*args).returncode == 1
    assert record(root, FAILING_RUN)["attempts"] == 1
    write_config(config, fixed=True)  # Fix the cause; without --retry_failed nothing runs.
    result = launch(*args)
    assert result.returncode == 1 and "starting 0 of 1 runs" in result.stdout
    assert record(root, FAILING_RUN)["attempts"] == 1
    result = launch(*args, "--retry_failed")
    assert result.returncode == 0, result.stdout + result.stderr
    rec = record(root, FAILING_RUN)
    assert rec["status"] == "done" and rec["attempts"] == 2
    assert (root / FAILING_RUN / "results.json").exists()
    log = (root / FAILING_RUN / "log.txt").read_text()
    assert "=== attempt 1," in log and "=== attempt 2," in log


def test_killed_sweep_is_interrupted_then_resumed(tmp_path):
    _, sweep_file = write_sweep_files(tmp_path)
    root = tmp_path / "root"
    args = (f"--sweep={sweep_file}:one", f"--root={root}")
    proc = subprocess.Popen([sys.executable, "-m", "launch.sweep", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (root / "seed=0" / "launch.json").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        running = launch(*args, "--status")
        pid = record(root, "seed=0")["pid"]
        assert f"running     seed=0  {root / 'seed=0' / 'log.txt'}  (pid {pid} on" in (
            running.stdout)
        assert "starting 0 of 1 runs" in launch(*args).stdout  # Left alone while it runs.
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # The launcher and its run, as a lost host would.
        proc.wait()
    assert not (root / "seed=0" / "results.json").exists()
    assert "1 interrupted (1 runs)" in launch(*args, "--status").stdout
    result = launch(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "starting 1 of 1 runs" in result.stdout
    assert record(root, "seed=0")["attempts"] == 2
    assert (root / "seed=0" / "results.json").exists()


# A training run of 400 short epochs (digits, batch 16; seconds of training after its first
# progress line, where 40 epochs gave under one, and a signal then often came after them).
TRAINING_SWEEP = """\
from launch.sweeps import Sweep

train = Sweep(config="experiments/configs/train.py:quick", runs=[{"train.seed": 0}],
              fixed={"train.num_epochs": 400, "train.batch_size": 16,
                     "eval.eval_importance_samples": 10})
"""
PROGRESS = re.compile(r"train: \d+/\d+ steps")
STOPPED = re.compile(r"^interrupted at step (\d+); rerun the same command to resume$", re.M)


def training_sweep(directory: Path) -> tuple[Path, runs.Run]:
    """Writes TRAINING_SWEEP; returns its file and its one run under `directory/root`."""
    sweep_file = directory / "training_sweeps.py"
    sweep_file.write_text(TRAINING_SWEEP)
    run, = runs.from_sweep(sweeps.get(f"{sweep_file}:train"), directory / "root")
    return sweep_file, run


def wait_for_training(run: runs.Run, alive) -> None:
    """Waits until the run's log shows a progress line of its training."""
    deadline = time.monotonic() + TIMEOUT_S
    while not (run.log.exists() and PROGRESS.search(run.log.read_text())):
        assert time.monotonic() < deadline and alive(), (
            run.log.read_text() if run.log.exists() else "no log")
        time.sleep(0.05)


def test_ctrl_c_interrupts_a_training_run_which_a_rerun_resumes(tmp_path, monkeypatch):
    sweep_file, run = training_sweep(tmp_path)
    args = (f"--sweep={sweep_file}:train", f"--root={tmp_path / 'root'}")
    # The runs inherit it: the rerun reuses the first attempt's compilations.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
    # Started as from a terminal, with SIGINT's default action: a child inherits an ignored
    # SIGINT (pytest started in the background by a shell script has one), and Python then
    # leaves Ctrl-C ignored in the launcher. A Python-level handler here is reset at exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "launch.sweep", *args], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    wait_for_training(run, lambda: proc.poll() is None)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the launcher and its run.
    _, stderr = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 130, stderr
    assert "the same command resumes them" in stderr
    log = run.log.read_text()
    assert len(STOPPED.findall(log)) == 1 and "Traceback" not in log, log
    assert record(tmp_path / "root", run.name)["status"] == "interrupted"
    assert "1 interrupted (1 runs)" in launch(*args, "--status").stdout
    result = launch(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "starting 1 of 1 runs" in result.stdout and "1 done (1 runs)" in result.stdout
    assert "sweep: 1/1 runs (100%)" in result.stderr  # The launcher's progress line.
    step = STOPPED.findall(log)[0]
    assert f"Resumed from the checkpoint at step {step}." in run.log.read_text()
    assert record(tmp_path / "root", run.name)["attempts"] == 2


def test_a_run_that_a_signal_stopped_is_interrupted_not_failed(tmp_path):
    _, run = training_sweep(tmp_path)
    run.path.mkdir(parents=True)
    write_json(run.record_path, {"status": "running", "attempts": 1})
    run.log.write_text("")
    for returncode, status in ((130, "interrupted"), (143, "interrupted"),
                               (-signal.SIGTERM, "interrupted"), (1, "failed"),
                               (0, "failed")):  # 0 without results.json
        assert runs.finish(run, returncode) == status
        assert runs.state(run).status == status
    assert "exit code 143: SIGTERM" in run.log.read_text()


def test_slurm_warning_signal_checkpoints_the_run_and_requeues_its_job(tmp_path, monkeypatch):
    from launch import executors

    _, run = training_sweep(tmp_path)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
    job, = executors.submit_slurm([run], tmp_path / "root" / ".submitit", cluster="local",
                                  time_min=10)
    wait_for_training(run, lambda: not job.done())
    # What Slurm does before the time limit: USR2 to every process of the job step, here
    # the job's task (submitit's, which runs SlurmJob) and the run it started.
    pid = record(tmp_path / "root", run.name)["pid"]
    task = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    for process in (task, pid):
        os.kill(process, signal.SIGUSR2)
    assert job.result() == "done"  # After the requeued job resumed the run.
    log = run.log.read_text()
    step = STOPPED.findall(log)
    assert len(step) == 1 and "=== interrupted at" in log, log
    assert f"Resumed from the checkpoint at step {step[0]}." in log
    rec = record(tmp_path / "root", run.name)
    assert rec["status"] == "done" and rec["attempts"] == 2


def test_root_holding_another_sweep_is_refused(flaky_root):
    _, root, _ = flaky_root
    result = launch("--sweep=estimators_smoke", f"--root={root}", "--status")
    assert result.returncode == 2
    assert f"--root: {root / 'seed=0'} holds a run of config" in result.stderr


# --- Slurm executor --------------------------------------------------------------------

def test_slurm_path_runs_jobs_through_submitits_local_executor(tmp_path):
    _, sweep_file = write_sweep_files(tmp_path)
    root = tmp_path / "root"
    result = launch(f"--sweep={sweep_file}:pair", f"--root={root}", "--executor=slurm",
                    "--submitit_cluster=local", "--time_min=10", "--wait")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 done, 1 failed (2 runs)" in result.stdout
    for name in ("seed=0", FAILING_RUN):
        rec = record(root, name)
        submitted = json.loads((root / name / "submitted.json").read_text())
        assert rec["executor"] == "slurm" and rec["cluster"] == "local"
        assert rec["job_id"] == submitted["job_id"]
        assert f"submitted {name}: job {submitted['job_id']}" in result.stdout
    assert (root / "seed=0" / "results.json").exists()
    assert record(root, FAILING_RUN)["status"] == "failed"
    job_log = (root / ".submitit" / f"{record(root, FAILING_RUN)['job_id']}_0_log.err")
    assert f"run {FAILING_RUN} failed; log: {root / FAILING_RUN / 'log.txt'}" in (
        job_log.read_text())


FAKE_SBATCH = """#!/bin/sh
echo "$@" >> {calls}
cp "$1" {script}
echo "Submitted batch job 4242"
"""


REJECTING_SBATCH = """#!/bin/sh
echo "sbatch: error: invalid partition specified: nope" >&2
exit 1
"""


def fake_slurm(directory: Path, queue: str, sbatch: str = FAKE_SBATCH) -> dict:
    """An environment whose PATH has fake sbatch, srun and squeue (listing `queue`)."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(exist_ok=True)
    files = {"sbatch": sbatch.format(calls=directory / "calls.txt",
                                     script=directory / "script.sh"),
             "srun": "#!/bin/sh\nexit 1\n",
             "squeue": f"#!/bin/sh\nprintf '{queue}'\n"}
    for name, text in files.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_sbatch_script_has_the_requested_resources(tmp_path):
    root = tmp_path / "root"
    args = ("--sweep=estimators_smoke", f"--root={root}", "--executor=slurm",
            "--partition=gpu", "--time_min=30", "--gpus=1", "--cpus=4", "--parallel=1")
    result = launch(*args, env=fake_slurm(tmp_path, "PENDING\\n"))
    assert result.returncode == 0, result.stdout + result.stderr
    script = (tmp_path / "script.sh").read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --array=0-1%1",
                 "#SBATCH --job-name=estimators_smoke", "#SBATCH --signal=USR2@120",
                 f"cd {REPO}"):
        assert line in script.splitlines(), (line, script)
    assert "srun --unbuffered" in script and "-m submitit.core._submit" in script
    assert (tmp_path / "calls.txt").read_text().count("\n") == 1
    assert "submitted seed=1: job 4242_1" in result.stdout
    status = launch(*args, "--status", env=fake_slurm(tmp_path, "PENDING\\n"))
    assert "2 queued (2 runs)" in status.stdout and "(job 4242_0)" in status.stdout
    again = launch(*args, env=fake_slurm(tmp_path, "PENDING\\n"))
    assert "starting 0 of 2 runs" in again.stdout  # Queued jobs are not submitted twice.
    assert (tmp_path / "calls.txt").read_text().count("\n") == 1
    gone = launch(*args, "--status", env=fake_slurm(tmp_path, ""))
    assert "2 interrupted (2 runs)" in gone.stdout
    assert "job 4242_0 ended before the run started" in gone.stdout


def test_rejected_submission_is_reported_and_submitted_again(tmp_path):
    root = tmp_path / "root"
    args = ("--sweep=estimators_smoke", f"--root={root}", "--executor=slurm", "--partition=nope")
    result = launch(*args, env=fake_slurm(tmp_path, "", sbatch=REJECTING_SBATCH))
    assert result.returncode == 1
    assert ("launch.sweep: --executor=slurm: submitting failed: sbatch: error: invalid partition"
            in result.stderr)
    status = launch(*args, "--status", env=fake_slurm(tmp_path, ""))
    assert "2 interrupted (2 runs)" in status.stdout
    assert "(submission failed: sbatch: error: invalid partition specified: nope)" in status.stdout
    result = launch(*args, env=fake_slurm(tmp_path, "PENDING\\n"))
    assert result.returncode == 0 and "2 queued (2 runs)" in result.stdout


def test_slurm_without_slurm_says_so(tmp_path):
    env = dict(os.environ, PATH=os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "srun").exists()))
    result = launch("--sweep=estimators_smoke", f"--root={tmp_path}", "--executor=slurm", env=env)
    assert result.returncode == 2
    assert "--executor=slurm: Could not detect \"srun\"" in result.stderr
    assert "--submitit_cluster=local" in result.stderr


# --- collect ---------------------------------------------------------------------------

def fake_training_run(root: Path, kl: str, seed: int, elbo: float) -> None:
    """A finished training run's files, as the training experiment and launcher write them."""
    overrides = {"kl": kl, "seed": seed}
    path = root / sweeps.run_name(overrides)
    path.mkdir(parents=True)
    config = {"experiment": "train", "kl": kl, "seed": seed, "hidden": [200, 200],
              "data_options": {"obs_dim": 20}}
    (path / "config.json").write_text(json.dumps(config))
    (path / "launch.json").write_text(json.dumps({"overrides": overrides, "status": "done"}))
    (path / "results.json").write_text(json.dumps(  # Like train's, it repeats kl and seed.
        {"test_elbo": elbo, "active_units": 7, "steps": 100, "kl": kl, "seed": seed}))


def test_the_dict_valued_leaves_are_the_train_configs():
    from vaekl import config as vaekl_config

    dict_valued = [k for k, v in vaekl_config.leaves(vaekl_config.get_config()).items()
                   if hasattr(v, "items")]
    assert tuple(dict_valued) == sweeps.DICT_LEAVES
    assert sweeps.leaves({"data": {"data_options": {"obs_dim": 20}}, "loss": {"kl": "k1"}}) == {
        "data_options.obs_dim": 20, "kl": "k1"}


def test_collect_writes_csv_and_mean_std_over_seeds(tmp_path):
    elbos = {"k1": [-90.0, -91.0, -95.0], "k3": [-88.0, -88.5, -89.0]}
    for kl, values in elbos.items():
        for seed, elbo in enumerate(values):
            fake_training_run(tmp_path, kl, seed, elbo)
    (tmp_path / "kl=stl,seed=0").mkdir()
    (tmp_path / "kl=stl,seed=0" / "launch.json").write_text("{}")
    paths = collect.collect(tmp_path)
    lines = paths["csv"].read_text().splitlines()
    assert lines[0] == ("run,kl,seed,test_elbo,active_units,steps,config.experiment,"
                        "config.hidden,config.data_options.obs_dim")
    assert len(lines) == 7 and '"(200, 200)"' in lines[1]
    summary = paths["summary"].read_text()
    assert "6 finished runs (1 not finished)." in summary and "Grouped by `kl`" in summary
    assert "over the `runs` of its group (seeds 0, 1, 2)" in summary
    assert "The same in every run: active_units = 7, steps = 100." in summary
    assert "| kl | runs | test_elbo |" in summary
    for kl, values in elbos.items():
        mean, std = statistics.fmean(values), statistics.stdev(values)
        assert f"| {kl} | 3 | {mean:.4g} ± {std:.4g} |" in summary
    assert paths["plot"].stat().st_size > 0


def test_collect_flattens_estimator_rows(flaky_root):
    _, root, _ = flaky_root
    paths = collect.collect(root)
    header, *rows = paths["csv"].read_text().splitlines()
    assert header.startswith("run,seed,row,experiment,")
    assert len(rows) == 2 * 6  # 2 runs x (3 cases x 2 estimators)
    summary = paths["summary"].read_text()
    assert "2 finished runs (1 not finished)." in summary and "Grouped by `row`" in summary
    assert "The same in every run: experiment = estimators, dim = 1," in summary
    assert "| row | runs | bias_over_true | bias_over_true_se | bias_z | estimator |" in summary
    bias = [json.loads((root / f"seed={s}" / "results.json").read_text())["rows"][3]
            ["bias_over_true"] for s in (0, 1)]
    mean, std = statistics.fmean(bias), statistics.stdev(bias)
    row3 = next(line for line in summary.splitlines() if line.startswith("| 3 | 2 | "))
    assert row3.startswith(f"| 3 | 2 | {mean:.4g} ± {std:.4g} | ") and " | k3 | " in row3
    by_estimator = collect.collect(root, group_by=["estimator"], metric="std_over_true")
    assert "| estimator | runs |" in by_estimator["summary"].read_text()
    assert "| k3 | 2 | " in by_estimator["summary"].read_text()


def test_collect_errors_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--root: no run under"):
        collect.collect(tmp_path)
    fake_training_run(tmp_path, "k1", 0, -90.0)
    with pytest.raises(ValueError, match=r"--group_by: unknown column\(s\) \['nope'\]"):
        collect.collect(tmp_path, group_by=["nope"])
    with pytest.raises(ValueError, match=r"--metric: unknown column\(s\) \['kl'\]"):
        collect.collect(tmp_path, metric="kl")


@pytest.mark.slow
def test_smoke_sweep_end_to_end(tmp_path):
    """The shipped `smoke` sweep (8 training runs on digits) at --parallel=2, then collect."""
    root = tmp_path / "smoke"
    result = launch("--sweep=smoke", f"--root={root}", "--parallel=2")
    assert result.returncode == 0, result.stdout + result.stderr
    names = [p.name for p in root.iterdir() if (p / "results.json").exists()]
    assert len(names) >= 8
    again = launch("--sweep=smoke", f"--root={root}", "--parallel=2")
    assert again.returncode == 0
    assert all(record(root, n)["attempts"] == 1 for n in names)  # the rerun started nothing
    collected = subprocess.run([sys.executable, "-m", "launch.collect", f"--root={root}"],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stderr
    assert (root / "results.csv").exists() and (root / "summary.md").exists()
    assert "test_elbo" in (root / "summary.md").read_text()


def test_collect_plot_says_which_way_is_better_and_n_per_group():
    assert collect.direction("test_elbo") == "higher is better"
    assert collect.direction("test_log_likelihood") == "higher is better"
    assert collect.direction("test_nll") == "lower is better"
    assert collect.direction("std_over_true") == "lower is better"
    assert collect.direction("test_rate") == ""  # A trade-off, not a score.
    assert collect.direction("test_elbo_std") == ""  # Both words: say nothing.
    groups = collect.group([{"run": "a", "kl": "k1"}, {"run": "b", "kl": "k1"},
                            {"run": "c", "kl": "k3"}], ["kl"])
    assert collect.plot_labels(groups, ["kl"]) == ["kl=k1  (n=2)", "kl=k3  (n=1)"]


def test_a_run_recorded_with_the_flat_config_names_is_the_same_run(tmp_path):
    """launch.json of a run from before the config was nested (`{"kl": ...}`) matches the
    sweep's run of the nested names (`{"loss.kl": ...}`), and only that run."""
    run = runs.Run(name="kl=k1", workdir=str(tmp_path), config="c.py",
                   overrides={"loss.kl": "k1"}, fixed={"data.dataset": "digits"})
    (tmp_path / "launch.json").write_text(json.dumps(
        {"config": "c.py", "overrides": {"kl": "k1"}, "fixed": {"dataset": "digits"}}))
    runs.check_matches(run)
    other = runs.Run(name="kl=k1", workdir=str(tmp_path), config="c.py",
                     overrides={"loss.kl": "k3"}, fixed={"data.dataset": "digits"})
    with pytest.raises(ValueError, match="holds a run of config"):
        runs.check_matches(other)
