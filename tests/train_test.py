"""End-to-end tests of `vaekl.train.train_and_evaluate` on the embedded data sets."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from experiments.configs import train as train_config
from vaekl import checkpoint, train
from vaekl import config as vaekl_config
from vaekl import progress as progress_lib
from vaekl import steps as steps_lib
from vaekl import workdir as workdir_lib

REPO = Path(__file__).resolve().parents[1]


def make_config(preset="quick", **overrides):
    """train.py's `preset` with IWAE-20 and `overrides` (leaf name -> value), each set in
    its group (`kl` is config.loss.kl)."""
    config = train_config.get_config(preset)
    config.eval.eval_importance_samples = 20
    groups = vaekl_config.groups()
    for k, v in overrides.items():
        config[groups[k]][k] = v
    return config


def final_state(workdir, template=None) -> dict:
    ckpt = checkpoint.Checkpointer(Path(workdir) / "checkpoints")
    step, state = ckpt.restore_latest(template)
    assert step is not None
    return state


def read_metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_quick_run_writes_the_workdir(tmp_path):
    results = train.train_and_evaluate(make_config(num_epochs=2), str(tmp_path))
    for name in ("config.json", "metrics.jsonl", "results.json", "reconstructions.png",
                 "samples.png"):
        assert (tmp_path / name).exists(), name
    on_disk = json.loads((tmp_path / "results.json").read_text())
    for field in ("test_elbo", "test_log_likelihood", "test_rate", "test_distortion",
                  "active_units", "num_params", "steps", "train_wall_s"):
        assert field in on_disk, field
    assert on_disk == json.loads(json.dumps(results))
    assert results["steps"] == 2 * results["steps_per_epoch"]
    # Bounds: ELBO = -(rate + distortion) and IWAE >= ELBO (up to noise on 300 examples).
    assert results["test_elbo"] == pytest.approx(
        -(results["test_rate"] + results["test_distortion"]), rel=1e-5)
    assert results["test_log_likelihood"] > results["test_elbo"] - 0.5
    assert len(results["per_dim_kl"]) == 20
    assert np.sum(results["per_dim_kl"]) == pytest.approx(results["test_rate"], rel=1e-4)
    train_steps = [m["step"] for m in read_metrics(tmp_path) if m["split"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == results["steps"] - (
        results["steps"] % 10)


@pytest.mark.parametrize("gradient,kl", [
    ("gumbel", "relaxed"), ("score", "k1"),
    pytest.param("st_gumbel", "analytic", marks=pytest.mark.slow)])  # The suite's time.
def test_a_categorical_vae_trains_and_is_evaluated_as_the_discrete_model(tmp_path, gradient, kl):
    """The categorical_quick preset (digits, 4 x 10 latents) with each gradient: finite
    losses, and the test ELBO and IWAE of the discrete model (hard draws, exact KL)."""
    results = train.train_and_evaluate(
        make_config("categorical_quick", categorical_gradient=gradient, kl=kl, num_epochs=1,
                    eval_examples=50), str(tmp_path))
    train_rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert train_rows and all(np.isfinite(r["loss"]) for r in train_rows)
    assert results["test_elbo"] == pytest.approx(
        -(results["test_rate"] + results["test_distortion"]), rel=1e-5)
    assert 0 < results["test_rate"] <= 4 * np.log(10) + 1e-4  # The exact KL to uniform.
    assert results["test_elbo"] - 1.0 < results["test_log_likelihood"] < 0


def test_the_baseline_is_a_bias_corrected_mean_of_past_elbos_and_tau_follows_jang():
    ema, values = jnp.zeros(()), []
    for step, elbo in enumerate([-100.0, -100.0, -100.0]):
        values.append(float(steps_lib.baseline_value(ema, jnp.asarray(step), 0.99)))
        ema = steps_lib.update_baseline(ema, jnp.asarray(elbo), 0.99)
    assert values[0] == 0.0 and values[1:] == pytest.approx([-100.0, -100.0], rel=1e-5)
    config = make_config("categorical_quick")
    taus = [float(steps_lib.temperature(config.loss, jnp.asarray(s)))
            for s in (0, 999, 1000, 10**5)]
    assert taus == pytest.approx([1.0, 1.0, np.exp(-0.03), 0.5], rel=1e-6)


def test_eval_examples_evaluates_the_first_test_examples_with_their_standard_error(tmp_path):
    config = make_config(num_epochs=1, eval_examples=40)
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert results["test_examples"] == 40
    # They are the first 40 of the test split.
    _, test = train.load_data(make_config())
    assert len(test) > 40
    _, cut = train.load_data(config)
    np.testing.assert_array_equal(cut.x, test.x[:40])
    for name in ("test_elbo", "test_log_likelihood"):
        assert 0 < results[f"{name}_se"] < 20, name
    with pytest.raises(ValueError, match=r"config.eval.eval_examples: 100000 is more than the"):
        train.load_data(make_config(eval_examples=100_000))
    with pytest.raises(ValueError, match=r"config.eval.eval_examples"):
        train.train_and_evaluate(make_config(eval_examples=-1), str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()  # Refused before anything is written.


def test_the_epoch_compiles_once(tmp_path, caplog):
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        train.train_and_evaluate(make_config(num_epochs=3), str(tmp_path))
    compiles = [r for r in caplog.records if "Compiling jit(epoch_fn)" in r.getMessage()]
    assert len(compiles) == 1


def test_resume_gives_bitwise_equal_parameters(tmp_path):
    full = make_config(num_epochs=4, checkpoint_every_epochs=1)
    train.train_and_evaluate(full, str(tmp_path / "full"))
    part = make_config(num_epochs=2, checkpoint_every_epochs=1)
    train.train_and_evaluate(part, str(tmp_path / "resumed"))
    results = train.train_and_evaluate(full, str(tmp_path / "resumed"))
    assert_trees_equal(final_state(tmp_path / "full"), final_state(tmp_path / "resumed"))
    full_results = json.loads((tmp_path / "full" / "results.json").read_text())
    assert results["test_elbo"] == full_results["test_elbo"]
    steps = [m["step"] for m in read_metrics(tmp_path / "resumed") if m["split"] == "train"]
    assert steps == [m["step"] for m in read_metrics(tmp_path / "full")
                     if m["split"] == "train"]


@pytest.mark.slow  # About a minute: in CI's slow pass.
def test_seeds_in_one_program_match_separate_runs(tmp_path):
    # On CPU the seeds' epochs run one after another (lax.map); the vmapped form is below.
    vmapped = train.train_and_evaluate(make_config(num_epochs=2, num_seeds=4, seed=3),
                                       str(tmp_path / "both"))
    for s, seed in enumerate((3, 4, 5, 6)):
        alone = train.train_and_evaluate(make_config(num_epochs=2, seed=seed),
                                         str(tmp_path / f"seed{seed}"))
        per_seed = vmapped["seeds"][s]
        assert per_seed["seed"] == seed
        for field in ("test_elbo", "test_rate", "test_log_likelihood"):
            assert per_seed[field] == pytest.approx(alone[field], rel=1e-4, abs=1e-4), field
        both = final_state(tmp_path / "both")["params"]
        one = final_state(tmp_path / f"seed{seed}")["params"]
        for x, y in zip(jax.tree.leaves(both), jax.tree.leaves(one)):
            np.testing.assert_allclose(np.asarray(x)[s], np.asarray(y), rtol=1e-4, atol=1e-5)


def test_vmapped_and_mapped_seeds_train_alike():
    config = make_config(num_seeds=3)
    model = train.models.VAE(latents=config.model.latents, data_dim=64,
                             hidden=tuple(config.model.hidden))
    tx = train.create_optimizer(config, 10)
    x = jax.random.uniform(jax.random.key(0), (10 * config.train.batch_size, 64))
    states = {}
    for vmap_seeds in (True, False):
        keys, init, epoch = steps_lib.training_fns(model, config, tx, data_dim=64, steps_per_epoch=10,
                                               binarize=True, vmap_seeds=vmap_seeds)
        state, metrics = epoch(init(keys), keys, 0, x)
        assert metrics["loss"].shape == (3, 10)
        states[vmap_seeds] = (state, metrics)
    for a, b in zip(jax.tree.leaves(states[True]), jax.tree.leaves(states[False])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The seeds differ from each other: each is its own run.
    assert not np.allclose(states[False][1]["loss"][0], states[False][1]["loss"][1])


def _run_subprocess(workdir, devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    code = ("import sys; from tests.train_test import make_config; from vaekl import train;"
            " train.train_and_evaluate(make_config(num_epochs=2), sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(workdir)], check=True, cwd=REPO, env=env,
                   capture_output=True, timeout=300)
    return json.loads((Path(workdir) / "results.json").read_text())


@pytest.mark.slow  # About a minute: in CI's slow pass.
def test_four_devices_give_the_one_device_result(tmp_path):
    one = _run_subprocess(tmp_path / "one", 1)
    four = _run_subprocess(tmp_path / "four", 4)
    assert (one["devices"], four["devices"]) == (1, 4)
    for field in ("test_elbo", "test_rate", "test_distortion", "test_log_likelihood"):
        assert four[field] == pytest.approx(one[field], rel=1e-4, abs=1e-4), field
    one_state = final_state(tmp_path / "one")
    # Restored onto this process's one device: the template carries the sharding.
    four_state = final_state(tmp_path / "four", template=one_state)
    for x, y in zip(jax.tree.leaves(one_state["params"]), jax.tree.leaves(four_state["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_linear_gaussian_iwae_matches_the_exact_likelihood(tmp_path):
    results = train.train_and_evaluate(train_config.get_config("linear"), str(tmp_path))
    exact = results["test_model_log_likelihood"]  # log p_theta(x) of the trained model.
    assert abs(results["test_log_likelihood"] - exact) < 0.05
    assert results["test_elbo"] <= exact
    # The trained model is also close to the one that generated the data.
    assert abs(exact - results["exact_test_log_likelihood"]) < 0.1


@pytest.mark.parametrize("field,value,message", [
    ("kl", "k9", r"^config\.loss\.kl: "),
    ("optimizer", "adamax", r"^config\.optim\.optimizer: "),
    ("batch_size", 0, r"^config\.train\.batch_size "),
    ("batch_size", 5000, r"^config\.train\.batch_size: "),
    ("num_samples", 0, r"^config\.loss\.num_samples "),
    ("latents", -2, r"^config\.model\.latents "),
    ("learning_rate", 0.0, r"^config\.optim\.learning_rate: "),
    ("hidden", (200, 0), r"^config\.model\.hidden: "),
    ("free_bits", 0.5, r"^config\.loss\.free_bits: "),  # with kl="k1", below
    ("prior", "mixture", r"^config\.loss\.kl: "),  # with kl="analytic"
    ("dataset", "cifar99", "name"),
    ("prior", "uniform",
     "config.model.prior: posterior='categorical' and prior='uniform' go together"),
    ("categorical_gradient", "reinforce", r"^config\.loss\.categorical_gradient: "),
])
def test_bad_config_is_refused_with_the_field_named(tmp_path, field, value, message):
    config = make_config(**{field: value})
    if field == "free_bits":
        config.loss.kl = "k1"
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_different_config_does_not_overwrite_a_run(tmp_path):
    train.train_and_evaluate(make_config(num_epochs=1), str(tmp_path))
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(ValueError, match="different config.*kl"):
        train.train_and_evaluate(make_config(num_epochs=1, kl="k3"), str(tmp_path))
    assert (tmp_path / "results.json").read_text() == before


def test_config_json_always_describes_the_results(tmp_path):
    train.train_and_evaluate(make_config(num_epochs=2), str(tmp_path))
    results = (tmp_path / "results.json").read_text()
    steps = json.loads(results)["steps"]
    # Fewer epochs than trained: refused, naming the field; nothing rewritten.
    with pytest.raises(ValueError, match="config.train.num_epochs: .* trained for 2 epochs"):
        train.train_and_evaluate(make_config(num_epochs=1), str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_epochs"] == 2
    assert (tmp_path / "results.json").read_text() == results
    # More epochs: it trains on, and config.json and results.json say 3.
    again = train.train_and_evaluate(make_config(num_epochs=3), str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_epochs"] == 3
    assert again["steps"] == steps // 2 * 3
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == again["steps"]


def test_a_run_from_before_a_new_config_field_resumes_with_its_default(tmp_path):
    config = vaekl_config.complete(make_config(num_epochs=1))
    workdir_lib.prepare(str(tmp_path), config)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["model"]["iaf_context"], saved["eval"]["eval_examples"]  # From before them.
    (tmp_path / "config.json").write_text(json.dumps(saved))
    workdir_lib.prepare(str(tmp_path), config)  # The defaults: the same run.
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config.eval.eval_examples = 10  # Evaluation only: resumable.
    workdir_lib.prepare(str(tmp_path), config)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config.model.iaf_context = 5
    with pytest.raises(ValueError, match=r"different config \(model.iaf_context: 20 -> 5\)"):
        workdir_lib.prepare(str(tmp_path), config)


def test_a_workdir_with_a_flat_config_json_resumes_through_the_leaf_names(tmp_path):
    """config.json as written before the config was nested (one flat dict of leaves)."""
    config = vaekl_config.complete(make_config(num_epochs=1))
    flat = vaekl_config.leaves(json.loads(config.to_json_best_effort()))
    assert "kl" in flat and "loss" not in flat
    (tmp_path / "config.json").write_text(json.dumps(flat))
    workdir_lib.prepare(str(tmp_path), config)  # The same run: resumes, written nested.
    assert json.loads((tmp_path / "config.json").read_text())["loss"]["kl"] == "analytic"
    (tmp_path / "config.json").write_text(json.dumps(flat))
    config.eval.eval_importance_samples = 7  # The eval group: resumable by rule.
    workdir_lib.prepare(str(tmp_path), config)
    (tmp_path / "config.json").write_text(json.dumps(flat))
    config.loss.kl = "k3"
    with pytest.raises(ValueError, match=r"different config \(loss.kl: 'analytic' -> 'k3'\)"):
        workdir_lib.prepare(str(tmp_path), config)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"holds a config.json that is not a config"):
        workdir_lib.prepare(str(tmp_path), config)


@pytest.mark.slow
def test_flax_example_setting_reaches_its_published_elbo(tmp_path):
    """binarized_mnist, 784-500-20 ReLU, batch 128, Adam 1e-3, 10 epochs: test ELBO >= -103.6."""
    pytest.importorskip("tensorflow")
    from vaekl import prepare

    manual = REPO.parent / "shared" / "data" / "binarized_mnist"
    if not manual.exists():
        pytest.skip(f"shared data not found at {manual}")
    prepare.prepare("binarized_mnist", manual_dir=manual, data_dir=tmp_path / "tfds")
    config = train_config.get_config("flax")
    config.data.data_dir = str(tmp_path / "tfds")
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert results["steps"] == 3900
    assert results["test_elbo"] >= -103.6


# ---------------------------------------------------------------------------------------
# Notebook use: `import vaekl` light, submodules on demand, partial configs completed.
# ---------------------------------------------------------------------------------------


def _lazy_modules():
    """The modules of vaekl/ that `import vaekl` does not load itself (every other one)."""
    eager = {"distributions", "elbo", "kl", "posteriors"}
    return sorted(p.stem for p in (REPO / "vaekl").glob("*.py")
                  if p.stem != "__init__" and p.stem not in eager)


def test_import_vaekl_is_light_and_reaches_its_modules_on_demand():
    code = (
        "import json, sys, vaekl\n"
        "loaded = [m for m in ('tensorflow', 'vaekl.train', 'vaekl.data', 'vaekl.models',"
        " 'vaekl.config') if m in sys.modules]\n"
        "fn = vaekl.train.train_and_evaluate\n"
        "names = [getattr(vaekl, m).__name__ for m in sys.argv[1:]]\n"
        "print(json.dumps({'loaded_by_import': loaded, 'fn': fn.__module__ + '.' + fn.__name__,"
        " 'names': names, 'tensorflow_after': 'tensorflow' in sys.modules}))\n"
        "try:\n"
        "    vaekl.no_such_module\n"
        "except AttributeError as e:\n"
        "    print(e)\n")
    modules = _lazy_modules()
    out = subprocess.run([sys.executable, "-c", code, *modules], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    found = json.loads(out[0])
    assert found["loaded_by_import"] == []
    assert found["fn"] == "vaekl.train.train_and_evaluate"
    assert found["names"] == [f"vaekl.{m}" for m in modules]
    assert not found["tensorflow_after"]
    assert out[1] == "module 'vaekl' has no attribute 'no_such_module'"


def test_every_module_is_listed_as_lazy():
    import vaekl

    assert sorted(vaekl.LAZY_MODULES) == _lazy_modules()
    assert set(vaekl.LAZY_MODULES) <= set(dir(vaekl))


def test_a_partial_config_is_completed_from_the_defaults():
    partial = ConfigDict(dict(data=dict(dataset="linear_gaussian"), train=dict(num_epochs=2),
                              model=dict(hidden=[16])))
    full = vaekl_config.complete(partial)
    expected = vaekl_config.get_config().to_dict()
    expected["data"]["dataset"], expected["train"]["num_epochs"] = "linear_gaussian", 2
    expected["model"]["hidden"] = (16,)
    assert full.to_dict() == expected
    assert sorted(partial.keys()) == ["data", "model", "train"]  # Left unchanged.
    assert sorted(partial.train.keys()) == ["num_epochs"]
    # A plain dict too; `nest` puts flat (old) names in their groups.
    assert vaekl_config.complete(dict(train=dict(num_epochs=2))).train.num_epochs == 2
    assert vaekl_config.complete(vaekl_config.nest(dict(kl="k3"))).loss.kl == "k3"
    flax = train_config.get_config("flax")
    assert vaekl_config.complete(flax).to_json_best_effort() == flax.to_json_best_effort()


@pytest.mark.parametrize("fields, error, message", [
    (dict(train=dict(num_epoch=2)), ValueError,
     r"^config\.train\.num_epoch: unknown field; did you mean 'num_epochs'\?$"),
    (dict(data=dict(dataset="digits"), zzz=1), ValueError,
     r"^config\.zzz: unknown field; expected a field of vaekl\.config\.get_config\(\)\.$"),
    (dict(model=dict(latents="many")), TypeError, r"^config\.model\.latents: "),
    (dict(num_epochs=2), ValueError,  # The flat layout of before: told the new place.
     r"^config\.num_epochs: unknown field; it is config\.train\.num_epochs \("),
])
def test_a_bad_partial_config_is_refused_with_the_field_named(tmp_path, fields, error, message):
    with pytest.raises(error, match=message):
        train.train_and_evaluate(ConfigDict(fields), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_partial_config_trains_outside_app_run_with_its_progress_on_stderr(tmp_path):
    # A fresh process, as a notebook kernel: no absl flags parsed, no app.run.
    code = ("import sys, vaekl, ml_collections\n"
            "config = ml_collections.ConfigDict(dict(train=dict(num_epochs=1),"
            " eval=dict(eval_importance_samples=0)))\n"
            "vaekl.train.train_and_evaluate(config, sys.argv[1])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, check=True)
    assert re.search(r"train\.py:\d+\] digits: \d+ parameters", proc.stderr), proc.stderr
    assert re.search(r"train: 23/23 steps ", proc.stderr), proc.stderr
    assert "orbax" not in proc.stderr and "checkpoint_manager" not in proc.stderr
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == json.loads(vaekl_config.complete(
        dict(train=dict(num_epochs=1), eval=dict(eval_importance_samples=0))).to_json_best_effort())


# --- TensorBoard, timestamps, learning curve, interrupts ----------------------------------

def read_events(logdir) -> dict:
    """TensorBoard's own reader of the event files in `logdir`: tag -> [(step, value)] and
    the image tags."""
    # TensorBoard's switch to its TensorFlow stub (as its no-TensorFlow build sets it): the
    # reader then reads local files without importing TensorFlow.
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)]
               for tag in acc.Tags()["scalars"]}
    return scalars, acc.Tags()["images"]


def quick(**overrides):
    """The config of `quick_run`: 3 epochs of 23 steps, an eval after each, checkpoints."""
    return make_config(**{"eval_every_epochs": 1, "checkpoint_every_epochs": 1, **overrides})


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """An uninterrupted run of `quick()` (copied by tests that change it)."""
    workdir = tmp_path_factory.mktemp("quick") / "run"
    train.train_and_evaluate(quick(), str(workdir))
    return workdir


def test_tensorboard_event_files_hold_the_scalars_and_images(quick_run):
    # Written without TensorFlow: a fresh process writes events and has not imported it (this
    # one may have, through another test's tfds preparation).
    code = ("import sys, pathlib, vaekl.workdir as w\n"
            "d = pathlib.Path(sys.argv[1]); d.mkdir()\n"
            "m = w.MetricWriter(d, resume_step=0)\n"
            "m.write_scalars(1, {'x': 1.0}, split='train'); m.close()\n"
            "assert 'tensorflow' not in sys.modules and 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code, str(quick_run.parent / "tb_alone")], cwd=REPO,
                   check=True)
    scalars, images = read_events(quick_run / "tensorboard")
    rows = read_metrics(quick_run)
    for split in ("train", "eval"):
        split_rows = [r for r in rows if r["split"] == split]
        names = [k for k, v in split_rows[-1].items()
                 if k not in ("step", "split", "time") and not isinstance(v, list)]
        assert len(names) >= 4, names
        for name in names:
            want = [(r["step"], pytest.approx(r[name], rel=1e-6), pytest.approx(r["time"]))
                    for r in split_rows if name in r]
            assert scalars[f"{split}/{name}"] == want, name
    per_dim = [r["per_dim_kl"] for r in rows if r["split"] == "eval"][-1]
    assert [scalars[f"eval_per_dim_kl/{j:02d}"][-1][1] for j in range(20)] == pytest.approx(
        per_dim, rel=1e-6)
    assert images == ["images/reconstructions", "images/samples"]
    # An eval after epochs 1 and 2 of 3, and the final one.
    assert [s for s, _, _ in scalars["eval/test_elbo"]] == [23, 46, 69]
    # The steps of an epoch are stamped apart, in order, not all with the epoch's end.
    times = [r["time"] for r in rows if r["split"] == "train"]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert (quick_run / "learning_curve.png").stat().st_size > 0


def test_a_resumed_runs_event_files_read_as_one_run(tmp_path, quick_run):
    workdir = tmp_path / "run"
    shutil.copytree(quick_run, workdir)
    before = read_events(workdir / "tensorboard")[0]
    # The process "died" after the last epoch's events were written but before its checkpoint.
    shutil.rmtree(workdir / "checkpoints" / "69")
    train.train_and_evaluate(quick(), str(workdir))
    after = read_events(workdir / "tensorboard")[0]
    assert len(list((workdir / "tensorboard").iterdir())) == 2  # One event file a process.
    for tag in ("train/elbo", "eval/test_elbo"):
        # The replayed steps replace the first process's (TensorBoard's restart marker),
        # with the same values: no step twice.
        assert [(s, v) for s, v, _ in after[tag]] == [(s, v) for s, v, _ in before[tag]], tag
    steps = [m["step"] for m in read_metrics(workdir) if m["split"] == "train"]
    assert [s for s, _, _ in after["train/elbo"]] == steps == [10, 20, 30, 40, 50, 60]


def test_a_signal_stops_training_with_a_checkpoint_and_the_rerun_ends_alike(
        tmp_path, quick_run, monkeypatch):
    advance = progress_lib.Progress.advance
    calls = []

    def advance_then_signal(self, *args, **kwargs):
        calls.append("loss" in kwargs)  # The training loop's (evaluation counts batches).
        if sum(calls) == 2 and calls[-1]:  # After epoch 2: as if SIGTERM came during it.
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # The watcher thread sets the flag.
        return advance(self, *args, **kwargs)

    monkeypatch.setattr(progress_lib.Progress, "advance", advance_then_signal)
    config = quick(checkpoint_every_epochs=0)  # No checkpoint but the interrupt's.
    with pytest.raises(train.interrupt.Interrupted) as info:
        train.train_and_evaluate(config, str(tmp_path))
    assert (info.value.step, info.value.signum) == (46, signal.SIGTERM)
    assert checkpoint.Checkpointer(tmp_path / "checkpoints").steps() == [46]
    assert not (tmp_path / "results.json").exists()
    monkeypatch.setattr(progress_lib.Progress, "advance", advance)
    train.train_and_evaluate(config, str(tmp_path))
    assert_trees_equal(final_state(quick_run), final_state(tmp_path))

    def without_times(workdir):
        return [{k: v for k, v in m.items() if k != "time"} for m in read_metrics(workdir)]

    assert without_times(tmp_path) == without_times(quick_run)


def test_a_signal_after_the_final_evaluation_lets_the_run_finish(tmp_path, quick_run,
                                                                   monkeypatch, caplog):
    write_results = workdir_lib.write_results

    def signal_then_write(*args, **kwargs):  # As if SIGTERM came as the results were written.
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # The watcher thread sets the flag.
        return write_results(*args, **kwargs)

    monkeypatch.setattr(workdir_lib, "write_results", signal_then_write)
    workdir = tmp_path / "run"
    results = train.train_and_evaluate(quick(), str(workdir))
    assert results["test_elbo"] == json.loads((quick_run / "results.json").read_text())["test_elbo"]
    assert (workdir / "learning_curve.png").stat().st_size > 0  # Written after the signal.
    assert "SIGTERM came after the final evaluation: the run finished." in caplog.text
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # The handler is restored.


def test_several_seeds_get_an_event_folder_each(tmp_path):
    writer = workdir_lib.MetricWriter(tmp_path, resume_step=0, seeds=[3, 4])
    writer.write_scalars(10, {"elbo": [-90.0, -95.0], "per_dim_kl": [[1.0, 2.0], [3.0, 4.0]]},
                         split="eval", wall_time=1000.0)
    writer.close()
    for seed, elbo, kls in ((3, -90.0, [1.0, 2.0]), (4, -95.0, [3.0, 4.0])):
        scalars, _ = read_events(tmp_path / "tensorboard" / f"seed_{seed}")
        assert scalars == {"eval/elbo": [(10, elbo, 1000.0)],
                           "eval_per_dim_kl/0": [(10, kls[0], 1000.0)],
                           "eval_per_dim_kl/1": [(10, kls[1], 1000.0)]}
    assert read_metrics(tmp_path) == [{"step": 10, "split": "eval", "time": 1000.0,
                                       "elbo": [-90.0, -95.0],
                                       "per_dim_kl": [[1.0, 2.0], [3.0, 4.0]]}]
