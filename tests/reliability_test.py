"""Reliability: bad input, divergence, killed runs, corrupt checkpoints, determinism.

Nothing is lost and every error is clear:
  1. bad input to the public functions and to `python -m experiments.main` fails at
     once with a message that names the argument and what was expected, never a
     traceback from inside JAX;
  2. a non-finite loss stops training with the step and the metric and keeps the
     last good checkpoint (`on_nan="skip"` skips such steps instead);
  3. a run killed at any point (after a checkpoint, inside a checkpoint write, at
     random), or stopped by SIGINT or SIGTERM (one line, exit status 130 or 143), and
     rerun ends bitwise equal to an uninterrupted one;
  4. a corrupt checkpoint is moved aside with a warning and the one before it used;
  5. the same config and seed give the same results.

The command-line runs are real subprocesses. Those that train share a persistent
JAX compilation cache, so each costs its start-up rather than a compile, except the
two fresh runs of the determinism test, which compile from scratch.
"""

import concurrent.futures
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vaekl
from tests.train_test import assert_trees_equal, final_state, make_config, read_metrics
from vaekl import bounds, checkpoint, data, elbo, kl, train
from vaekl.distributions import DiagNormal, mixture
from vaekl import steps as steps_lib
from vaekl import workdir as workdir_lib

REPO = Path(__file__).resolve().parents[1]
TRAIN = "--config=experiments/configs/train.py:quick"
ESTIMATORS = "--config=experiments/configs/estimators.py:quick"
WALL_TIMES = ("train_wall_s", "total_wall_s")

# ---------------------------------------------------------------------------------------
# 1. Bad input: one table of cases, in-process calls and command lines alike.
# ---------------------------------------------------------------------------------------

KEY = jax.random.key(0)
MEAN = jnp.zeros((4, 3))
LOG_VAR = jnp.zeros((4, 3))
Q = DiagNormal(MEAN, LOG_VAR)


def _log_lik(z):
    return jnp.zeros(z.shape[:-1])


def _cosine(num_epochs):
    return make_config(schedule="cosine", num_epochs=num_epochs)


class Cli(NamedTuple):
    """A command line after `python`; {w} is a fresh workdir, {file} a regular file, {empty}
    an empty folder (no tfds data, no frey file), {raw} a folder of raw files (no tfds data)."""

    args: tuple


def _main(*args):
    return Cli(("-m", "experiments.main", *args))


def case(id, what, fragments, error=None):
    """A bad input: `what` is a call `f(tmp_path)` that must raise `error`, or a `Cli` that
    must exit non-zero; either way the message holds every one of `fragments`."""
    return pytest.param(what, error, fragments, id=id)


BAD_INPUTS = [
    # Shapes and ranks.
    case("kl.analytic/event-axes-differ", lambda t: kl.analytic(MEAN, jnp.zeros((4, 5))),
         ["vaekl.kl.analytic", "q_mean[4, 3], q_log_var[4, 5]", "equal event (last) axes"],
         ValueError),
    case("kl.analytic/scalar", lambda t: kl.analytic(jnp.float32(0), jnp.float32(0)),
         ["`q_mean`", "shape [..., dim]", "scalar"], ValueError),
    case("elbo.elbo/scalar",
         lambda t: elbo.elbo(KEY, DiagNormal(jnp.float32(0), jnp.float32(0)), _log_lik),
         ["vaekl.distributions.DiagNormal", "`mean` or `log_var`", "[..., dim]"], ValueError),
    case("kl.analytic_full/scale-shape", lambda t: kl.analytic_full(MEAN, jnp.ones((4, 2, 2))),
         ["`q_scale_tril`", "[..., 3, 3]", "got [4, 2, 2]"], ValueError),
    case("kl.sampled/mixture-of-other-dim",
         lambda t: kl.sampled(KEY, MEAN, LOG_VAR, prior=mixture(KEY, 3, 5)),
         ["vaekl.kl.sampled", "prior.means[0][5]", "do not broadcast"], ValueError),
    case("elbo.elbo/log-likelihood-shape",
         lambda t: elbo.elbo(KEY, Q, lambda z: jnp.zeros(z.shape)),
         ["`log_likelihood`", "to shape [1, 4]", "got [1, 4, 3]"], ValueError),
    # Dtypes.
    case("kl.analytic/int32", lambda t: kl.analytic(jnp.zeros((4, 3), jnp.int32), LOG_VAR),
         ["`q_mean`", "floating-point", "int32"], TypeError),
    case("kl.sampled/uint8-pixels", lambda t: kl.sampled(KEY, np.zeros((4, 3), np.uint8), LOG_VAR),
         ["vaekl.kl.sampled", "`q_mean`", "uint8"], TypeError),
    case("kl.analytic/bool", lambda t: kl.analytic(MEAN, np.zeros((4, 3), bool)),
         ["`q_log_var`", "floating-point", "bool"], TypeError),
    case("kl.analytic/list-of-ints", lambda t: kl.analytic([[0, 1, 2]], LOG_VAR),
         ["`q_mean`", "int64"], TypeError),
    case("kl.analytic_full/int-scale",
         lambda t: kl.analytic_full(MEAN, jnp.zeros((4, 3, 3), jnp.int32)),
         ["`q_scale_tril`", "int32"], TypeError),
    # NaN and inf (value checks: under vaekl.checked).
    case("checked(kl.analytic)/nan",
         lambda t: vaekl.checked(jax.jit(kl.analytic))(MEAN.at[1, 2].set(jnp.nan), LOG_VAR),
         ["vaekl.kl.analytic", "`q_mean` has NaN or inf"], FloatingPointError),
    case("checked(kl.sampled)/inf",
         lambda t: vaekl.checked(jax.jit(kl.sampled))(KEY, MEAN, LOG_VAR.at[0, 0].set(jnp.inf)),
         ["vaekl.kl.sampled", "`q_log_var` has NaN or inf"], FloatingPointError),
    case("checked(elbo.elbo)/nan",
         lambda t: vaekl.checked(jax.jit(lambda q: elbo.elbo(KEY, q, _log_lik).elbo))(
             DiagNormal(MEAN, LOG_VAR.at[3, 1].set(jnp.nan))),
         ["vaekl.elbo.elbo", "`q.log_var` has NaN or inf"], FloatingPointError),
    case("checked(bounds.iwae)/-inf",
         lambda t: vaekl.checked(jax.jit(lambda q: bounds.iwae(KEY, q, _log_lik,
                                                               num_samples=4)))(
             DiagNormal(MEAN.at[0, 0].set(-jnp.inf), LOG_VAR)),
         ["vaekl.bounds.iwae", "`q.mean` has NaN or inf"], FloatingPointError),
    case("kl.analytic/nan-literal", lambda t: kl.analytic(MEAN, LOG_VAR, p_mean=float("nan")),
         ["`p_mean` is nan"], FloatingPointError),
    # Counts.
    case("kl.sampled/num_samples=0", lambda t: kl.sampled(KEY, MEAN, LOG_VAR, num_samples=0),
         ["`num_samples` must be >= 1", "got 0"], ValueError),
    case("elbo.elbo/num_samples=-1",
         lambda t: elbo.elbo(KEY, Q, _log_lik, num_samples=-1),
         ["vaekl.elbo.elbo", "`num_samples` must be >= 1", "got -1"], ValueError),
    case("kl.sampled/num_samples=2.0", lambda t: kl.sampled(KEY, MEAN, LOG_VAR, num_samples=2.0),
         ["`num_samples` must be an int >= 1", "2.0"], TypeError),
    case("bounds.iwae/chunk_size=0",
         lambda t: bounds.iwae(KEY, Q, _log_lik, num_samples=8, chunk_size=0),
         ["`chunk_size` must be >= 1"], ValueError),
    # Names.
    case("kl.sampled/estimator", lambda t: kl.sampled(KEY, MEAN, LOG_VAR, estimator="k4"),
         ["unknown estimator 'k4'", "('k1', 'k2', 'k3')"], ValueError),
    case("elbo.elbo/kl", lambda t: elbo.elbo(KEY, Q, _log_lik, kl="k2"),
         ["unknown kl 'k2'", "('analytic', 'k1', 'k3', 'stl', 'entropy', 'relaxed')"], ValueError),
    case("kl.analytic/mixture-prior",
         lambda t: kl.analytic(MEAN, LOG_VAR, prior=mixture(KEY, 3, 3)),
         ["no closed form", "vaekl.kl.sampled(..., prior=prior)"], ValueError),
    case("kl.sampled/prior-type", lambda t: kl.sampled(KEY, MEAN, LOG_VAR, prior="normal"),
         ["`prior` must be a distribution with `log_prob`", "got str"], TypeError),
    case("elbo.elbo/log-likelihood-not-callable",
         lambda t: elbo.elbo(KEY, Q, 3.0),
         ["`log_likelihood` must be a function z -> log p(x|z)", "got float"], TypeError),
    # Keys.
    case("kl.sampled/key=None", lambda t: kl.sampled(None, MEAN, LOG_VAR),
         ["vaekl.kl.sampled", "`key` must be a single PRNG key", "got None"], TypeError),
    case("bounds.iwae/batch-of-keys",
         lambda t: bounds.iwae(jax.random.split(KEY, 3), Q, _log_lik, num_samples=2),
         ["vaekl.bounds.iwae", "`key`", "shape [3]", "jax.vmap"], TypeError),
    case("elbo.elbo/q-not-a-distribution", lambda t: elbo.elbo(KEY, (MEAN, LOG_VAR), _log_lik),
         ["vaekl.elbo.elbo", "`q` must be a distribution", "got tuple"], TypeError),
    # Data.
    case("data.load/name", lambda t: data.load("cifar99"),
         ["vaekl.data.load: unknown name 'cifar99'", "expected one of", "'digits'"], ValueError),
    case("data.load/split", lambda t: data.load("digits", "validation"),
         ["vaekl.data.load('digits'): unknown split 'validation'", "('train', 'test')"],
         ValueError),
    case("data.load/seed", lambda t: data.load("digits", seed=-1),
         ["vaekl.data.load: `seed` must be >= 0", "got -1"], ValueError),
    case("data.load/option", lambda t: data.load("digits", obs_dim=3),
         ["unknown options ['obs_dim']", "config.data.data_options"], TypeError),
    case("data.load/frey-without-path", lambda t: data.load("frey_face"),
         ["frey_face needs path= (config.data.data_path)", "frey_rawface.mat"], FileNotFoundError),
    case("data.load/frey-missing-file",
         lambda t: data.load("frey_face", path=t / "frey_rawface.mat"),
         ["frey_face: path (config.data.data_path)", "is not a file"], FileNotFoundError),
    case("data.load/raw-files-as-data_dir",
         lambda t: data.load("binarized_mnist", data_dir=_raw_folder(t)),
         ["holds raw files (binarized_mnist.npz)", "--manual_dir of", "a different folder",
          "/raw --data_dir=DATA_DIR"], data.UnpreparedDatasetError),
    # Workdirs.
    case("workdir/under-a-file",
         lambda t: workdir_lib.prepare_workdir(str(_regular_file(t) / "run")),
         ["--workdir", "cannot create", "Not a directory"], ValueError),
    case("workdir/cosine-resumed-with-other-num_epochs",
         lambda t: [workdir_lib.prepare(str(t / "run"), _cosine(n)) for n in (2, 4)],
         ["different config", "num_epochs: 2 -> 4"], ValueError),
    # The command line: flags and config fields.
    case("cli/unknown-config-field", _main(TRAIN, "--workdir={w}", "--config.no_such_field=1"),
         ["--config.no_such_field:", "no field 'no_such_field'", "--help --config="]),
    case("cli/misspelt-config-field",
         _main(TRAIN, "--workdir={w}", "--config.optim.learning_rat=1"),
         ["--config.optim.learning_rat:", "did you mean 'learning_rate'?"]),
    case("cli/flat-config-field", _main(TRAIN, "--workdir={w}", "--config.learning_rate=1"),
         ["--config.learning_rate:", "it is config.optim.learning_rate"]),
    case("cli/unknown-nested-field",
         _main(TRAIN, "--workdir={w}", "--config.data.data_options.obs_dim=3"),
         ["--config.data.data_options.obs_dim:",
          "config.data.data_options has no field 'obs_dim'"]),
    case("cli/unknown-parent-field", _main(TRAIN, "--workdir={w}", "--config.net.latents=3"),
         ["--config.net.latents:", "config has no field 'net'"]),
    case("cli/unparsable-value",
         _main(TRAIN, "--workdir={w}", "--config.optim.learning_rate=abc"),
         ["--config.optim.learning_rate=abc", "could not convert"]),
    case("cli/missing-config-file", _main("--config={empty}/nope.py", "--workdir={w}"),
         ["--config:", "no such file", "nope.py"]),
    case("cli/unknown-preset",
         _main("--config=experiments/configs/train.py:bogus", "--workdir={w}"),
         ["--config:", "unknown preset 'bogus'", "quick, flax, iwae, iwae_k5", "linear"]),
    case("cli/no-workdir", _main(TRAIN), ["--workdir", "must have a value"]),
    case("cli/stray-argument", _main(TRAIN, "--workdir={w}", "stray"),
         ["unexpected arguments", "stray"]),
    case("cli/unknown-experiment", _main(TRAIN, "--workdir={w}", "--config.experiment=nope"),
         ["--config.experiment:", "unknown experiment 'nope'", "estimators"]),
    case("cli/config-of-another-experiment",
         _main(ESTIMATORS, "--workdir={w}", "--config.experiment=train"),
         ["--config:", "lacks the fields", "experiment 'train'", "experiments/configs/train.py"]),
    # The command line: values.
    case("cli/unknown-kl", _main(TRAIN, "--workdir={w}", "--config.loss.kl=k9"),
         ["config.loss.kl", "'k9'", "('analytic', 'k1', 'k3', 'stl', 'entropy', 'relaxed')"]),
    case("cli/unknown-estimator",
         _main(ESTIMATORS, "--workdir={w}", "--config.estimators=('k9',)"),
         ["--config.estimators:", "unknown value 'k9'", "k1, k2, k3"]),
    case("cli/unknown-dataset", _main(TRAIN, "--workdir={w}", "--config.data.dataset=mnits"),
         ["--config.data.dataset:", "'mnits'", "one of", "digits"]),
    case("cli/unknown-nested-dataset",
         _main("--config=experiments/configs/compare_training.py:quick", "--workdir={w}",
               "--config.vae.data.dataset=mnits"),
         ["--config.vae.data.dataset:", "'mnits'", "digits"]),
    case("cli/batch-larger-than-data",
         _main(TRAIN, "--workdir={w}", "--config.train.batch_size=5000"),
         ["config.train.batch_size", "5000", "1497 training examples"]),
    case("cli/unprepared-tfds",
         _main(TRAIN, "--workdir={w}", "--config.data.dataset=mnist",
               "--config.data.data_dir={empty}"),
         ["'mnist'", "not prepared", "config.data.data_dir",
          "python -m vaekl.prepare --dataset=mnist",
          "--data_dir={empty}"]),
    case("cli/raw-files-as-data_dir",
         _main(TRAIN, "--workdir={w}", "--config.data.dataset=binarized_mnist",
               "--config.data.data_dir={raw}"),
         ["config.data.data_dir", "{raw}", "holds raw files",
          "--manual_dir of `python -m vaekl.prepare`", "a different folder",
          "--manual_dir={raw} --data_dir=DATA_DIR"]),
    case("cli/frey-without-path",
         _main(TRAIN, "--workdir={w}", "--config.data.dataset=frey_face"),
         ["frey_face needs", "config.data.data_path", "frey_rawface.mat"]),
    case("cli/frey-missing-file",
         _main(TRAIN, "--workdir={w}", "--config.data.dataset=frey_face",
               "--config.data.data_path={empty}/frey_rawface.mat"),
         ["frey_face: path (config.data.data_path)", "{empty}/frey_rawface.mat", "is not a file"]),
    case("cli/workdir-under-a-file", _main(TRAIN, "--workdir={file}/run"),
         ["--workdir", "{file}/run", "Not a directory"]),
    # vaekl.data.load of an unprepared tfds data set, with no network: at once, not a hang.
    case("data.load/unprepared-tfds-subprocess",
         Cli(("-c", ("import sys; from vaekl import data\n"
                     "try: data.load('mnist', data_dir=sys.argv[1])\n"
                     "except data.UnpreparedDatasetError as e:\n"
                     "    sys.exit(type(e).__name__ + ': ' + str(e))"),
              "{empty}")),
         ["UnpreparedDatasetError", "'mnist'", "not prepared",
          "python -m vaekl.prepare --dataset=mnist --manual_dir=../shared/data/mnist",
          "--data_dir={empty}"]),
]


def _regular_file(tmp: Path) -> Path:
    path = tmp / "a_regular_file"
    path.write_text("not a folder\n")
    return path


def _raw_folder(tmp: Path) -> Path:
    """A folder like ../shared/data/binarized_mnist: raw files, no prepared tfds data."""
    path = tmp / "raw"
    path.mkdir(exist_ok=True)
    for name in ("binarized_mnist.npz", "write_amat.py"):
        (path / name).write_text("raw\n")
    return path


def _env(cache: Path | None = None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    return env


class Finished(NamedTuple):
    returncode: int
    stderr: str
    workdir: Path


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, reference):
    """Runs every command line of BAD_INPUTS, a few at a time; id -> `Finished`."""
    del reference  # Requested only to start the reference runs first: they run meanwhile.
    root = tmp_path_factory.mktemp("bad_cli")
    places = {"file": str(_regular_file(root)), "empty": str(root / "empty"),
              "raw": str(_raw_folder(root))}
    (root / "empty").mkdir()

    def run(param):
        cli = param.values[0]
        places_here = dict(places, w=str(root / param.id.replace("/", "_")))
        argv = [sys.executable] + [a.format(**places_here) for a in cli.args]
        # A generous bound, not a timing: a hang (a download, say) fails here.
        proc = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True,
                              timeout=60, check=False)
        return param.id, Finished(proc.returncode, proc.stderr, Path(places_here["w"]))

    params = [p for p in BAD_INPUTS if isinstance(p.values[0], Cli)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(pool.map(run, params))
    return results, places


@pytest.mark.parametrize("what,error,fragments", BAD_INPUTS)
def test_bad_input_fails_at_once_with_a_clear_message(what, error, fragments, request, tmp_path):
    if isinstance(what, Cli):
        results, places = request.getfixturevalue("cli_results")
        done, cli = results[request.node.callspec.id], what
        message = done.stderr
        assert done.returncode != 0, message
        assert "Traceback" not in message, message
        if cli.args[:2] == ("-m", "experiments.main"):
            # Printed once: no logged copy (absl's "E... ValueError: ...") beside it.
            assert message.lower().count("error:") == 1, message
        fragments = [f.format(**places) for f in fragments]
        # A refused config leaves no run behind in the workdir (it would block the fix).
        assert not (done.workdir / "config.json").exists()
    else:
        with pytest.raises(error) as info:
            what(tmp_path)
        message = str(info.value)
        # Raised by vaekl's own checks, not from deep inside JAX.
        raised_in = Path(str(info.traceback[-1].path)).resolve()
        assert REPO / "vaekl" in raised_in.parents, (raised_in, message)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_a_config_its_data_refuse_does_not_block_the_workdir(tmp_path):
    with pytest.raises(ValueError, match="config.train.batch_size: 5000"):
        train.train_and_evaluate(make_config(batch_size=5000), str(tmp_path))
    assert not (tmp_path / "config.json").exists()
    workdir_lib.prepare(str(tmp_path), make_config())  # The corrected config is accepted.


# ---------------------------------------------------------------------------------------
# Shared training runs: the kill, corrupt-checkpoint and determinism tests compare against
# the same uninterrupted run (digits, 64-500-20 at batch 16: 93 steps an epoch).
# ---------------------------------------------------------------------------------------

STEPS_PER_EPOCH = 93
RUN = (TRAIN, "--config.model.hidden=(500,)", "--config.train.batch_size=16",
       "--config.train.num_epochs=12", "--config.train.checkpoint_every_epochs=1",
       "--config.eval.eval_importance_samples=10", "--config.train.log_every_steps=31")


def _command(workdir, *extra):
    return [sys.executable, "-m", "experiments.main", *RUN, f"--workdir={workdir}", *extra]


def _start(workdir: Path, *extra, cache: Path | None) -> subprocess.Popen:
    """Starts RUN in `workdir`; its stderr goes to `<workdir>.log`, appended over restarts."""
    with open(f"{workdir}.log", "a") as log:
        return subprocess.Popen(_command(workdir, *extra), cwd=REPO, env=_env(cache),
                                stdout=subprocess.DEVNULL, stderr=log)


def _finish(proc: subprocess.Popen, workdir: Path, log_from: int = 0) -> str:
    """Waits for a run that must succeed; returns its stderr."""
    proc.wait(timeout=180)
    log = Path(f"{workdir}.log").read_text()[log_from:]
    assert proc.returncode == 0, log
    return log


def _run(workdir: Path, *extra, cache: Path | None) -> str:
    log = Path(f"{workdir}.log")
    size = len(log.read_text()) if log.exists() else 0
    return _finish(_start(workdir, *extra, cache=cache), workdir, size)


class Reference:
    """Two fresh, uninterrupted runs of RUN, side by side, each compiling from scratch."""

    def __init__(self, root: Path, cache: Path):
        self.cache = cache
        self.first, self.second = root / "reference", root / "reference_again"
        # The first fills the (empty) compilation cache that the later runs of RUN use.
        self._procs = [_start(self.first, cache=cache), _start(self.second, cache=None)]
        self._done = False

    def stop(self):
        """Kills runs still going (a failed or deselected test left them unwaited)."""
        for proc in self._procs:
            _kill(proc)

    def wait(self) -> "Reference":
        if not self._done:
            for proc, workdir in zip(self._procs, (self.first, self.second)):
                _finish(proc, workdir)
            self._done = True
        return self


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    runs = Reference(tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("jax_cache"))
    yield runs
    runs.stop()


def _steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _writing(workdir: Path, after: int = -1) -> bool:
    """Whether orbax's temporary folder of a checkpoint later than `after` is there."""
    folder = workdir / "checkpoints"
    return folder.is_dir() and any("tmp" in p.name and int(p.name.split(".")[0]) > after
                                   for p in folder.iterdir())


def _metrics_without_times(workdir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time"} for row in read_metrics(workdir)]


def _results_without_times(workdir: Path) -> dict:
    results = json.loads((workdir / "results.json").read_text())
    return {k: v for k, v in results.items() if k not in WALL_TIMES}


def assert_same_run(workdir: Path, reference: Path):
    """Bitwise equal final state, the same metrics.jsonl rows and the same results."""
    assert_trees_equal(final_state(reference), final_state(workdir))
    got, want = _metrics_without_times(workdir), _metrics_without_times(reference)
    assert [(m["step"], m["split"]) for m in got] == [(m["step"], m["split"]) for m in want]
    assert got == want
    assert _results_without_times(workdir) == _results_without_times(reference)


# ---------------------------------------------------------------------------------------
# 2. Divergence.
# ---------------------------------------------------------------------------------------


def test_divergence_stops_with_the_step_and_metric_and_keeps_the_last_good_checkpoint(
        tmp_path, reference):
    # SGD whose learning rate warms up linearly, 0.01 more each step, towards an absurd peak:
    # a few good epochs, then the updates overflow.
    workdir = tmp_path / "diverged"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.main", TRAIN, f"--workdir={workdir}",
         "--config.optim.optimizer=sgd", "--config.optim.schedule=warmup_cosine",
         "--config.optim.learning_rate=1000.0", "--config.optim.warmup_steps=100000",
         "--config.train.num_epochs=12", "--config.train.checkpoint_every_epochs=1",
         "--config.eval.eval_importance_samples=10"],
        cwd=REPO, env=_env(reference.cache), capture_output=True, text=True, timeout=180,
        check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    found = re.search(r"Training diverged at step (\d+): metrics? '(\w+)' is (-?inf|nan)"
                      r".* last good checkpoint \(step (\d+)\) is kept", proc.stderr)
    assert found, proc.stderr
    step, metric, kept = int(found[1]), found[2], int(found[4])
    steps_per_epoch = 1497 // 64
    assert metric in ("loss", "elbo", "rate", "distortion", "grad_norm")
    assert step > 2 * steps_per_epoch  # It diverged after good epochs were checkpointed ...
    assert kept == (step - 1) // steps_per_epoch * steps_per_epoch  # ... the last of them kept,
    assert _steps(workdir)[-1] == kept
    state = final_state(workdir)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    assert not (workdir / "results.json").exists()
    assert max(m["step"] for m in read_metrics(workdir)) <= kept


def _with_a_nan_example(monkeypatch, row: int):
    """Makes `train.load_data` return linear_gaussian data whose train example `row` is NaN."""
    load = train.load_data

    def load_with_nan(config):
        train_data, test_data = load(config)
        x = np.array(train_data.x)
        x[row] = np.nan
        return dataclasses.replace(train_data, x=x), test_data

    monkeypatch.setattr(train, "load_data", load_with_nan)


def _linear_config(**overrides):
    return make_config("linear", num_epochs=2, log_every_steps=1, checkpoint_every_epochs=1,
                       eval_importance_samples=20, **overrides)


def test_a_nan_example_stops_training_at_its_step(tmp_path, monkeypatch):
    row = 123
    _with_a_nan_example(monkeypatch, row)
    config = _linear_config()
    # The step whose batch holds the row: the first epoch's order, as train draws it.
    data_key = steps_lib.seed_keys(config.train.seed)["data"]
    order = jax.random.permutation(jax.random.fold_in(data_key, 0), 5000)
    step = int(np.flatnonzero(np.asarray(order) == row)[0]) // config.train.batch_size + 1
    with pytest.raises(train.TrainingDiverged,
                       match=rf"at step {step}: metrics 'loss' is nan.*checkpoint \(none\)"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "results.json").exists()


def test_on_nan_skip_skips_the_bad_steps_and_finishes(tmp_path, monkeypatch, caplog):
    _with_a_nan_example(monkeypatch, 123)
    with caplog.at_level(logging.WARNING):
        results = train.train_and_evaluate(_linear_config(on_nan="skip"), str(tmp_path))
    assert "Skipped 1 steps with a non-finite loss or gradient." in caplog.text
    rows = [m for m in read_metrics(tmp_path) if m["split"] == "train"]
    assert [m["step"] for m in rows] == list(range(1, 101))
    # One batch an epoch holds the NaN example (5000 examples, 50 batches of 100).
    skipped = [m["step"] for m in rows if m["skipped"]]
    assert len(skipped) == 2 and all(np.isnan(m["loss"]) for m in rows if m["skipped"])
    assert all(np.isfinite(m["loss"]) for m in rows if not m["skipped"])
    assert results["steps"] == 100
    for field in ("test_elbo", "test_log_likelihood", "test_model_log_likelihood"):
        assert np.isfinite(results[field]), field
    state = final_state(tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


# ---------------------------------------------------------------------------------------
# 3. Kill and resume.
# ---------------------------------------------------------------------------------------


def _wait_for(proc: subprocess.Popen, condition: Callable[[], bool]) -> bool:
    """Polls until `condition()` holds (True) or the run ends (False)."""
    deadline = time.monotonic() + 120
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.001)
    return True


def _kill(proc: subprocess.Popen) -> bool:
    """SIGKILLs the run; False if it had ended already."""
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _newest(workdir: Path) -> int:
    return (_steps(workdir) or [0])[-1]


@pytest.mark.slow  # About a minute: in CI's slow pass.
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path, reference):
    workdir = tmp_path / "killed"
    rng = random.Random(0)
    killed_at = []  # (when, the newest checkpoint's step after the kill)
    # Each run resumes the previous one's last checkpoint and is SIGKILLed: right after its
    # first checkpoint (three times), inside its first checkpoint write (orbax's temporary
    # folder is there), and at a random moment after its first checkpoint (twice).
    for when in ["after its checkpoint"] * 3 + ["mid-write"] + ["at random"] * 2:
        resumed_from = _newest(workdir)
        proc = _start(workdir, cache=reference.cache)
        if when == "mid-write":
            ready = _wait_for(proc, lambda after=resumed_from: _writing(workdir, after))
        else:
            ready = _wait_for(proc, lambda after=resumed_from: _newest(workdir) > after)
            if when == "at random":
                time.sleep(rng.uniform(0.0, 0.3))
        if ready and _kill(proc):
            killed_at.append((when, _newest(workdir)))
        else:
            assert when == "at random", (when, killed_at)  # Only these may come too late.
    log = _run(workdir, cache=reference.cache)  # The rerun that finishes.
    first_three = [step for _, step in killed_at[:3]]
    assert first_three == sorted(set(first_three)) and first_three[0] > 0, killed_at
    assert "Resumed from the checkpoint at step" in log
    assert not _writing(workdir)  # Interrupted writes are cleaned up, never restored.
    assert_same_run(workdir, reference.wait().first)


PROGRESS = re.compile(r"train: \d+/\d+ steps \(\d+%\), ([\d.e+]+) steps/s")
STOPPED = re.compile(r"^interrupted at step (\d+); rerun the same command to resume$", re.M)


def _signal_in_an_epoch(proc: subprocess.Popen, log: Path, log_from: int, signum: int,
                        steps_per_epoch: int, fraction: float,
                        timeout_s: float = 180) -> tuple[int, str]:
    """Sends `signum` `fraction` of an epoch after the run's first progress line, so inside
    the epoch after it (the line's rate gives the epoch's time); (return code, its log)."""
    deadline = time.monotonic() + timeout_s
    while not (found := PROGRESS.search(log.read_text()[log_from:])):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[log_from:]
        time.sleep(0.001)
    time.sleep(fraction * steps_per_epoch / float(found[1]))
    proc.send_signal(signum)
    proc.wait(timeout=timeout_s)
    return proc.returncode, log.read_text()[log_from:]


def _assert_stopped_cleanly(returncode: int, log: str, signum: int) -> int:
    """The run exited 128 + signum with the one line and no traceback; returns its step."""
    assert returncode == 128 + signum, log
    assert "Traceback" not in log, log
    found = STOPPED.findall(log)
    assert len(found) == 1, log
    return int(found[0])


def test_sigint_and_sigterm_stop_with_a_checkpoint_and_the_rerun_matches(tmp_path, reference):
    workdir, log = tmp_path / "signalled", tmp_path / "signalled.log"
    only_interrupts = "--config.train.checkpoint_every_epochs=0"  # No checkpoint but the signals'.
    rng = random.Random(1)
    stopped = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        log_from = len(log.read_text()) if log.exists() else 0
        proc = _start(workdir, only_interrupts, cache=reference.cache)
        returncode, text = _signal_in_an_epoch(proc, log, log_from, signum, STEPS_PER_EPOCH,
                                               rng.uniform(0.0, 1.0))
        step = _assert_stopped_cleanly(returncode, text, signum)
        # The epoch in flight was finished and checkpointed: nothing is lost.
        assert step % STEPS_PER_EPOCH == 0 and step > (stopped or [0])[-1], (step, stopped)
        assert _steps(workdir)[-1] == step
        stopped.append(step)
    text = _run(workdir, only_interrupts, cache=reference.cache)
    assert f"Resumed from the checkpoint at step {stopped[-1]}." in text
    assert_same_run(workdir, reference.wait().first)


@pytest.mark.slow
def test_a_flax_sized_run_interrupted_twice_ends_like_an_uninterrupted_one(tmp_path):
    """The flax preset (binarized MNIST, 784-500-20, batch 128, 390 steps an epoch) for 8
    epochs: SIGINT inside an epoch, then SIGTERM inside one after the resume's first.

    The signal's delay is timed by the first progress line's rate, which the first epoch
    after a start slows (to half the later ones' here): 8 epochs keep both signals inside
    training (5 let the second come after it)."""
    pytest.importorskip("tensorflow")
    from vaekl import prepare

    manual = REPO.parent / "shared" / "data" / "binarized_mnist"
    if not manual.exists():
        pytest.skip(f"shared data not found at {manual}")
    prepare.prepare("binarized_mnist", manual_dir=manual, data_dir=tmp_path / "tfds")
    argv = [sys.executable, "-m", "experiments.main", "--config=experiments/configs/train.py:flax",
            f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.train.num_epochs=8"]

    def start(workdir):
        with open(f"{workdir}.log", "a") as out:
            return subprocess.Popen([*argv, f"--workdir={workdir}"], cwd=REPO, env=_env(),
                                    stdout=subprocess.DEVNULL, stderr=out)

    reference = start(tmp_path / "reference")
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    rng = random.Random(2)
    stopped = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        log_from = len(log.read_text()) if log.exists() else 0
        returncode, text = _signal_in_an_epoch(start(workdir), log, log_from, signum, 390,
                                               rng.uniform(0.1, 0.9), timeout_s=1800)
        stopped.append(_assert_stopped_cleanly(returncode, text, signum))
        assert _steps(workdir)[-1] == stopped[-1]
    # Each after the epoch in flight, with its checkpoint: nothing is lost.
    assert stopped == sorted(set(stopped)) and all(s % 390 == 0 for s in stopped), stopped
    for proc, name in ((start(workdir), "run"), (reference, "reference")):
        assert proc.wait(timeout=1800) == 0, (tmp_path / f"{name}.log").read_text()
    assert_same_run(workdir, tmp_path / "reference")


# ---------------------------------------------------------------------------------------
# 4. Corrupt checkpoints.
# ---------------------------------------------------------------------------------------


def _data_files(step_dir: Path) -> list[Path]:
    return sorted((p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
                  key=lambda p: p.stat().st_size)


def _truncate(path: Path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _overwrite(path: Path):
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _flip_a_bit(path: Path):
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x10
    path.write_bytes(bytes(content))


CORRUPTIONS = {
    "truncated-data-file": lambda d: _truncate(_data_files(d)[-1]),
    "overwritten-data-file": lambda d: _overwrite(_data_files(d)[-1]),
    "every-data-file-truncated": lambda d: [_truncate(p) for p in _data_files(d)],
    "one-flipped-bit": lambda d: _flip_a_bit(_data_files(d)[-1]),
    "empty-_METADATA": lambda d: (d / "default" / "_METADATA").write_bytes(b""),
    "garbage-_METADATA": lambda d: _overwrite(d / "default" / "_METADATA"),
    "empty-ocdbt-manifest": lambda d: (d / "default" / "manifest.ocdbt").write_bytes(b""),
    "item-folder-deleted": lambda d: shutil.rmtree(d / "default"),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_checkpoint_is_moved_aside_and_the_one_before_restored(
        tmp_path, corrupt, caplog):
    def state(value):
        return {"w": jnp.full((64, 64), value, jnp.float32), "step": jnp.int32(value)}

    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
    ckpt.save(1, state(1))
    ckpt.save(2, state(2))
    corrupt(tmp_path / "checkpoints" / "2")
    with caplog.at_level(logging.WARNING):
        step, restored = ckpt.restore_latest(state(0))
    assert step == 1
    assert_trees_equal(restored, state(1))
    assert "Checkpoint at step 2" in caplog.text and "trying the one before" in caplog.text
    assert (tmp_path / "corrupt_checkpoint_2").is_dir()  # Moved aside, not deleted.
    assert ckpt.steps() == [1]
    ckpt.save(2, state(2))  # The step is written afresh, and read back.
    assert ckpt.restore_latest(state(0))[0] == 2
    ckpt.close()


class _StateBeforeBaseline(NamedTuple):
    """`steps.TrainState` as vaekl saved it before `baseline` was added (2026-12-07)."""
    step: jax.Array
    params: dict
    opt_state: tuple


def test_a_checkpoint_from_before_a_state_field_was_added_resumes(tmp_path, caplog):
    old = _StateBeforeBaseline(jnp.int32(7), {"w": jnp.arange(6.0).reshape(2, 3)},
                               (jnp.ones(4),))
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
    ckpt.save(7, old)
    template = steps_lib.TrainState(jnp.int32(0), {"w": jnp.zeros((2, 3))}, (jnp.zeros(4),),
                                    jnp.float32(0.5))
    with caplog.at_level(logging.WARNING):
        step, state = ckpt.restore_latest(template)
    assert step == 7 and isinstance(state, steps_lib.TrainState)
    assert_trees_equal(tuple(state[:3]), tuple(old))
    assert float(state.baseline) == 0.5  # The template's initial value.
    assert "written before the train state had baseline" in caplog.text
    assert "unreadable" not in caplog.text and not (tmp_path / "corrupt_checkpoint_7").exists()
    # A field the checkpoint has that the template lacks is no subset: still refused as
    # unreadable (and kept aside), not silently dropped.
    ckpt.save(8, steps_lib.TrainState(*old, jnp.float32(1.0)))
    assert ckpt.restore_latest(old)[0] == 7
    assert (tmp_path / "corrupt_checkpoint_8").is_dir()
    ckpt.close()


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, reference):
    """A run of RUN stopped after 2 of its 12 epochs: checkpoints at steps 93 and 186."""
    workdir = tmp_path_factory.mktemp("partial") / "run"
    _run(workdir, "--config.train.num_epochs=2", cache=reference.cache)
    assert _steps(workdir) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    return workdir


def test_a_corrupt_latest_checkpoint_resumes_from_the_one_before(
        tmp_path, two_checkpoints, reference):
    workdir = tmp_path / "run"
    shutil.copytree(two_checkpoints, workdir)
    _truncate(_data_files(workdir / "checkpoints" / str(2 * STEPS_PER_EPOCH))[-1])
    log = _run(workdir, cache=reference.cache)
    assert f"Checkpoint at step {2 * STEPS_PER_EPOCH}" in log and "unreadable" in log
    assert f"Resumed from the checkpoint at step {STEPS_PER_EPOCH}." in log
    assert (workdir / f"corrupt_checkpoint_{2 * STEPS_PER_EPOCH}").is_dir()
    assert_same_run(workdir, reference.wait().first)


def test_a_corrupt_only_checkpoint_is_kept_aside_and_training_restarts(
        tmp_path, two_checkpoints, reference):
    workdir = tmp_path / "run"
    shutil.copytree(two_checkpoints, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(2 * STEPS_PER_EPOCH))
    only = workdir / "checkpoints" / str(STEPS_PER_EPOCH)
    _overwrite(only / "default" / "_METADATA")
    log = _run(workdir, cache=reference.cache)
    # Nothing is lost: the unreadable checkpoint is kept aside, with a warning that says where.
    assert f"Checkpoint at step {STEPS_PER_EPOCH}" in log and "unreadable" in log
    aside = workdir / f"corrupt_checkpoint_{STEPS_PER_EPOCH}"
    assert f"Moved the unreadable checkpoint to {aside}." in log
    assert "Resumed from" not in log
    assert (aside / "default").is_dir()
    assert_same_run(workdir, reference.wait().first)


# ---------------------------------------------------------------------------------------
# 5. Determinism.
# ---------------------------------------------------------------------------------------


def test_the_same_config_and_seed_give_the_same_results(reference):
    reference.wait()
    assert_same_run(reference.second, reference.first)
    first = json.loads((reference.first / "results.json").read_text())
    assert all(first[k] > 0 for k in WALL_TIMES)  # Only these may differ.
