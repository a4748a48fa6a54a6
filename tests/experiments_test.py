"""End-to-end tests of the experiments of issue 4, through the main job's quick config.

`experiments/configs/main.py:quick` runs every part with that experiment's own quick
config (checked below), so one run of it (a module fixture, about two minutes on two
CPU cores) exercises estimators, gradient_variance, compare_training and posterior_gap
end to end; the tests then check the figures each part wrote.
"""

import importlib
import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from experiments import compare_training, main, report
from experiments.configs import catalog, presets
from experiments.configs import compare_training as compare_training_config
from experiments.configs import estimators as estimators_config
from experiments.configs import gradient_variance as gradient_variance_config
from experiments.configs import main as main_config
from experiments.configs import posterior_gap as posterior_gap_config
from experiments.configs import train as train_config

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = ("compare_training", "estimators", "gradient_variance", "main", "posterior_gap",
                "train")
PART_CONFIGS = {"estimators": estimators_config, "gradient_variance": gradient_variance_config,
                "compare_training": compare_training_config, "posterior_gap": posterior_gap_config}


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("main")
    results = main.run(main_config.get_config("quick"), str(workdir))
    return workdir, results


def part(workdir: Path, name: str) -> dict:
    return json.loads((workdir / name / "results.json").read_text())


def test_quick_main_runs_each_experiments_quick_config():
    config = main_config.get_config("quick")
    assert config.experiment == "main_job"
    for name, module in PART_CONFIGS.items():
        assert config[name].to_dict() == module.get_config("quick").to_dict(), name


def test_main_job_writes_every_part(main_run):
    workdir, results = main_run
    assert results["parts"] == list(PART_CONFIGS)
    plots = {"estimators": ["estimators.png"], "gradient_variance": ["gradient_variance.png"],
             "compare_training": ["learning_curves.png"],
             "posterior_gap": ["posterior_gap.png", "elbo_vs_log_px.png"]}
    for name, pngs in plots.items():
        for file in ["results.json", "results.md", *pngs]:
            assert (workdir / name / file).stat().st_size > 0, (name, file)
    summary = (workdir / "results.md").read_text()
    for name in PART_CONFIGS:
        assert f"## {name}" in summary
    assert json.loads((workdir / "results.json").read_text())["total_wall_s"] > 0


def test_estimators_reproduce_schulmans_table(main_run):
    rows = part(main_run[0], "estimators")["rows"]
    # Schulman (2020), q = N(0, 1): std/true (exact, by quadrature) and k2's bias/true.
    expected = {(0.1, "k1"): (0.0, 20.0), (0.1, "k2"): (0.0025, 1.418),
                (0.1, "k3"): (0.0, 1.417), (1.0, "k1"): (0.0, 2.0),
                (1.0, "k2"): (0.25, 1.732), (1.0, "k3"): (0.0, 1.695)}
    found = {(r["p_mean"], r["estimator"]): r for r in rows
             if r["dim"] == 1 and r["num_samples"] == 1 and r["p_log_var"] == 0.0}
    for key, (bias, std) in expected.items():
        row = found[key]
        assert row["std_over_true"] == pytest.approx(std, rel=0.05), key
        if key[1] == "k2":
            assert abs(row["bias_over_true"] - bias) < 0.02, key


def test_stl_gradient_has_zero_variance_at_the_exact_posterior(main_run):
    results = part(main_run[0], "gradient_variance")
    rows = {(r["model"], r["checkpoint"], r["estimator"]): r for r in results["rows"]}
    estimators = ("analytic", "k1", "k3", "stl")
    for ckpt in ("init", "early", "converged"):
        for e in estimators:
            assert ("vae", ckpt, e) in rows
    exact = {e: rows[("linear_gaussian", "exact_posterior", e)] for e in estimators}
    others = min(exact[e]["encoder_grad_variance"] for e in ("analytic", "k1", "k3"))
    assert others > 1e-3
    assert exact["stl"]["encoder_grad_variance"] < 1e-10 * others
    assert results["exact_posterior_stl_relative_encoder_variance"] < 1e-10
    assert exact["stl"]["encoder_grad_zero"] and exact["stl"]["encoder_snr"] is None
    # Off the posterior STL's variance is not zero.
    assert rows[("linear_gaussian", "perturbed_posterior", "stl")]["encoder_grad_variance"] > 1e-4
    # The decoder gradient does not involve the KL term: the same, non-zero, for every term.
    for (model, ckpt, _), r in rows.items():
        k1 = rows[(model, ckpt, "k1")]["decoder_grad_variance"]
        assert k1 > 0
        assert r["decoder_grad_variance"] == pytest.approx(k1, rel=1e-5)
    # Kingma & Welling: the analytic KL (SGVB-B) has lower encoder variance than k1 (SGVB-A).
    ratios = {(r["model"], r["checkpoint"]): r for r in results["ratios"]}
    for ckpt in ("init", "early", "converged"):
        assert ratios[("vae", ckpt)]["analytic_over_k1"] < 1.0


def test_posterior_gap_is_the_kl_to_the_posterior(main_run):
    results = part(main_run[0], "posterior_gap")
    rows = results["rows"]
    assert results["max_abs_identity_error"] < 1e-4
    assert all(r["max_abs_identity_error"] < 1e-4 for r in rows)
    for r in rows:
        assert r["mean_gap"] == pytest.approx(r["mean_kl_q_posterior"], abs=1e-9)
    exact = next(r for r in rows if r["variant"] == "exact_posterior")
    assert abs(exact["mean_gap"]) < 1e-10
    # Interpolating from the prior to the posterior: the gap falls monotonically to 0.
    interp = sorted((r["param"], r["mean_gap"]) for r in rows if r["variant"] == "interpolate")
    gaps = [g for _, g in interp]
    assert interp[-1][0] == 1.0 and abs(gaps[-1]) < 1e-10
    assert all(a > b for a, b in itertools.pairwise(gaps))
    # Scaling the posterior covariance by c: gap (k/2)(c - 1 - log c), least at c = 1.
    k = results["model"]["latent_dim"]
    for r in rows:
        if r["variant"] == "shrink":
            c = r["param"]
            assert r["mean_gap"] == pytest.approx(0.5 * k * (c - 1 - math.log(c)), abs=1e-9)
    # No diagonal q beats the mean-field floor; a trained full-covariance q gets close to 0.
    floor = results["mean_field_floor"]
    for r in rows:
        if r["variant"] in ("mean_field_optimal", "mean_field_marginals", "trained_mean_field"):
            assert r["mean_gap"] >= floor - 1e-9, r
    assert next(r for r in rows if r["variant"] == "mean_field_optimal")["mean_gap"] == \
        pytest.approx(floor, rel=1e-9)
    trained = [r for r in rows if r["variant"] == "trained_full"]
    assert trained[-1]["mean_gap"] < 0.1 < trained[0]["mean_gap"]
    # The Monte Carlo ELBO agrees with the closed form within its error.
    for check in results["sampled_check"]:
        assert abs(check["z_score"]) < 5, check


def test_compare_training_has_every_run(main_run, monkeypatch):
    workdir = main_run[0] / "compare_training"
    results = json.loads((workdir / "results.json").read_text())
    config = compare_training_config.get_config("quick")
    found = {(r["kl"], r["num_samples"]): r for r in results["rows"]}
    assert set(found) == {(kl, n) for kl in config.kls for n in config.num_samples}
    for r in found.values():
        assert r["num_seeds"] == config.vae.train.num_seeds
        assert len(r["test_elbo_seeds"]) == config.vae.train.num_seeds
        for field in ("test_elbo_mean", "test_elbo_std", "test_log_likelihood_mean",
                      "test_log_likelihood_std", "train_wall_s"):
            assert np.isfinite(r[field]), field
        assert r["test_elbo_std"] > 0
        # The IWAE bound is at least the ELBO (up to noise on 300 test examples).
        assert r["test_log_likelihood_mean"] > r["test_elbo_mean"] - 0.5
    curves = compare_training.read_curves(workdir / "runs" / "stl_n1" / "metrics.jsonl")
    assert curves["train"][1].shape[0] == config.vae.train.num_seeds
    assert curves["eval"][0].size == config.vae.train.num_epochs  # One test ELBO per epoch.

    # A rerun reads the finished runs instead of training them again.
    from vaekl import train

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train, "train_and_evaluate", no_training)
    again = compare_training.run(config, str(workdir))
    assert again["rows"] == results["rows"]


def test_every_estimated_figure_has_a_positive_standard_error(main_run):
    workdir = main_run[0]
    rows = part(workdir, "estimators")["rows"]
    for r in rows:
        # The bias SE is the estimates' std over sqrt(n) (here over the true KL).
        assert r["bias_over_true_se"] == pytest.approx(
            r["std_over_true"] / math.sqrt(r["num_draws"]), rel=1e-9)
        if r["estimator"] == "k3" and r["p_log_var"] > 0.25:  # var_p/var_q >= 4/3: E r^4 = inf
            assert r["std_over_true_se"] is None and r["std_z"] is None
        else:
            assert 0 < r["std_over_true_se"] < 0.1 * r["std_over_true"], r
            # k3's lognormal r: its sample std runs low, its SE is understated (results.md).
            assert r["estimator"] == "k3" or abs(r["std_z"]) < 5, r
        assert abs(r["bias_z"]) < 5, r  # The measured bias is noise about the exact one.
    text = (workdir / "estimators" / "results.md").read_text()
    k1 = next(r for r in rows if (r["estimator"], r["p_mean"], r["dim"]) == ("k1", 0.1, 1))
    cell = report.pm(k1["bias_over_true"], k1["bias_over_true_se"])
    assert f"k1, p = N(0.1, 1): bias/true {cell} against an exact 0" in text
    assert re.search(r"\| k1 \| 0\.1 \| 0 \| 1 \| 1 \| 0\.005 \| -?\d\.\d+ ± 0\.04\d \|", text)

    grads = part(workdir, "gradient_variance")
    for r in grads["rows"]:
        assert "jackknife" not in r
        fields = ["decoder_grad_variance", "decoder_snr", "batch_elbo"]
        if r["encoder_grad_zero"]:  # STL at the exact posterior: zero to rounding, no SNR.
            assert r["encoder_snr"] is None and r["encoder_snr_se"] is None
        else:
            fields += ["encoder_grad_variance", "encoder_snr"]
        for field in fields:
            assert r[f"{field}_se"] > 0, (field, r)
            # k3's gradient can have infinite variance (see results.md): its SE may be large.
            assert r["estimator"] == "k3" or r[f"{field}_se"] < abs(r[field]), (field, r)
    for r in grads["ratios"]:
        for e in ("analytic", "k3"):
            assert r[f"{e}_over_k1_se"] > 0, r
        # The decoder gradient is the same under every KL term: the ratio is 1, its SE ~0.
        assert r["decoder_analytic_over_k1_se"] < 1e-4

    for r in part(workdir, "compare_training")["rows"]:
        for field in ("test_elbo", "test_log_likelihood"):
            seeds = np.asarray(r[f"{field}_seeds"])
            assert r[f"{field}_mean_se"] == pytest.approx(
                seeds.std(ddof=1) / math.sqrt(seeds.size), rel=1e-9)
            assert r[f"{field}_std"] == pytest.approx(seeds.std(ddof=1), rel=1e-9)  # Not ddof 0.
    for check in part(workdir, "posterior_gap")["sampled_check"]:
        assert check["mc_elbo_se"] > 0
    summary = (workdir / "results.md").read_text()
    for section in summary.split("\n## ")[1:]:
        assert " ± " in section, section.splitlines()[0]  # Every part's table has SEs.


def test_each_training_run_writes_titled_images(main_run):
    runs = main_run[0] / "compare_training" / "runs"
    for sub in runs.iterdir():
        for name in ("reconstructions.png", "samples.png"):
            assert (sub / name).stat().st_size > 0, (sub, name)


def test_learning_curve_axis_shows_the_values_and_names_what_it_cuts():
    epochs = np.linspace(0.1, 10, 100)
    curve = -30 - 500 * np.exp(-5 * epochs)  # A plunge in the first epoch, then about -30.
    bottom, top, note = compare_training.y_range([(epochs, curve), (epochs, curve + 1)])
    assert curve.min() < bottom < -30.5 and top > -29
    assert f"down to {curve.min():.4g}" in note and "until epoch" in note
    assert compare_training.y_range([(epochs, -30 + epochs)])[2] == ""  # Nothing cut.


def test_a_figure_with_its_standard_error_is_one_cell():
    assert report.pm(0.005412, 0.006324) == "0.0054 ± 0.0063"
    assert report.pm(-98.1234, 0.31) == "-98.12 ± 0.31"
    assert report.pm(1.5, None) == "1.5"
    assert report.pm(1.916e-32, 4.4e-34) == "(1.916 ± 0.044)e-32"
    assert report.pm(-20.3835591, 7.7e-17) == "-20.38356 ± 7.7e-17"
    table = report.markdown_table([{"a": 0.005412, "a_se": 0.006324, "b": 2.0}], ("a", "b"))
    assert table.splitlines()[-1] == "| 0.0054 ± 0.0063 | 2 |"


# --- The entry point: --help, presets and the check of a config. ---


def _help(*args) -> str:
    result = subprocess.run([sys.executable, "-m", "experiments.main", "--help", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_lists_the_experiments_and_the_presets_of_each_config_file():
    text = _help()
    for name in ("compare_training", "estimators", "gradient_variance", "main_job",
                 "posterior_gap", "train"):
        assert re.search(rf"^  {name} +\S", text, re.M), name  # The name and its one line.
    for name in CONFIG_FILES:
        assert f"  experiments/configs/{name}.py  (experiment " in text, name
    for preset in ("quick", "flax", "iwae", "linear"):
        assert re.search(rf"^    :{preset} +\S", text, re.M), preset


def test_help_with_a_config_lists_its_fields_values_and_a_line_each():
    text = _help("--config=experiments/configs/train.py:quick")
    assert re.search(r"^  --config\.loss\.kl='analytic' +The ELBO's KL term, one of", text, re.M)
    assert re.search(r"^  --config\.train\.num_epochs=3 +Passes over", text, re.M)  # Preset's.
    assert re.search(r"^  --config\.data\.data_dir=None +tfds data_dir", text, re.M)
    assert re.search(r"^  --config\.model\.\* +The VAE: vaekl.models.VAE's fields", text, re.M)
    nested = _help("--config=experiments/configs/compare_training.py")
    assert re.search(r"^  --config\.kls=\('analytic', 'k1', 'k3', 'stl'\) +KL terms", nested,
                     re.M)
    assert re.search(r"^  --config\.vae\.train\.num_epochs=200 +Passes over", nested, re.M)


def _undocumented(config, file: str, path: str = "config") -> list[str]:
    """The fields of `config` (made by `file`) and of its experiments' sub-configs without
    the one-line comment that --help shows."""
    docs = catalog.field_docs(REPO / file)
    files = {experiment: f for experiment, (f, _) in catalog.defaults().items()}
    missing = [f"{path}.{key}" for key in config.keys() if key not in docs]
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict) and "experiment" in value:
            missing += _undocumented(value, files[value.experiment], f"{path}.{key}")
        elif isinstance(value, ml_collections.ConfigDict) and value:  # A group: model, ...
            missing += [f"{path}.{key}.{k}" for k in value.keys() if k not in docs]
    return missing


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_preset_is_documented_and_passes_the_check_and_no_other_is_taken(name):
    module = importlib.import_module(f"experiments.configs.{name}")
    for preset in (None, *module.PRESETS):
        config = module.get_config(preset)
        assert _undocumented(config, f"experiments/configs/{name}.py") == [], preset
        assert catalog.check(config) == [], preset
    expected = f"unknown preset 'bogus'; expected one of {', '.join(module.PRESETS)} or none."
    with pytest.raises(presets.UnknownPresetError, match=re.escape(expected)):
        module.get_config("bogus")


def test_check_names_each_field_the_experiment_refuses():
    fields = dict(train_config.get_config().to_dict(), no_such_field=1)
    fields["model"]["hidden"], fields["train"]["num_epochs"] = 7, 2.5
    problems = catalog.check(ml_collections.ConfigDict(fields))
    assert problems == [
        "--config.no_such_field: config has no field 'no_such_field'; `python -m"
        " experiments.main --help --config=experiments/configs/train.py` lists them.",
        "--config.model.hidden: expected tuple, got 7.",
        "--config.train.num_epochs: expected int, got 2.5."]
    config = main_config.get_config("quick")
    config.compare_training.vae.data.dataset = "mnits"
    config.parts = ("estimators", "nope")
    assert catalog.check(config) == [
        "--config.parts: unknown value 'nope'; expected each to be one of estimators,"
        " gradient_variance, compare_training, posterior_gap.",
        "--config.compare_training.vae.data.dataset: unknown value 'mnits'; expected one of"
        " binarized_mnist, digits, fashion_mnist, frey_face, linear_gaussian, mnist, omniglot."]
    with pytest.raises(ValueError, match=r"^--config\.data\.dataset: unknown value 'mnits'"):
        main.run(config.compare_training.vae, "unused")  # Refused before it runs.
