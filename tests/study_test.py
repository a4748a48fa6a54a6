"""The study end to end: the `burda_quick` sweep (real subprocesses), then `launch.collect`."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launch import collect, studies, study, sweeps
from vaekl import config as vaekl_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # Eight real runs (~2.5 min); CI runs it in its `-m slow` pass.
def test_burda_quick_sweep_and_its_table(tmp_path):
    root = tmp_path / "study"
    run = subprocess.run([sys.executable, "-m", "launch.sweep", "--sweep=burda_quick",
                          f"--root={root}", "--parallel=2"], cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = subprocess.run([sys.executable, "-m", "launch.collect", f"--root={root}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = (root / "summary.md").read_text()
    # Digits with IWAE-20: the table says so, and puts no published figure beside it.
    assert "on `digits`, scored by the IWAE-20 bound of 300 test images" in summary
    assert "No published figure stands beside these rows" in summary and "Δ Burda" not in summary
    rows = list(csv.DictReader(open(root / "study.csv")))
    labels = [r["row"] for r in rows]
    assert labels == ["VAE k=1, KL analytic", "VAE k=1, KL k1", "VAE k=1, KL k3",
                      "VAE k=1, KL stl", "VAE k=5, KL analytic", "IWAE k=5, dreg",
                      "IWAE k=5, reparam", "IWAE k=5, stl"]
    for r in rows:
        assert int(r["n"]) == (3 if r["num_samples"] == "1" else 2)
        ll, std = float(r["test_log_likelihood_mean"]), float(r["test_log_likelihood_std"])
        assert ll < 0 and std >= 0 and f"| {r['row']} | {r['n']} | {ll:.2f} ± {std:.2f}" in summary
        assert r["burda"] == r["diff_burda"] == r["nbip"] == "" and r["eval_k"] == "20"
    assert "| analytic − k1 (VAE k=1) | 3 |" in summary
    assert "| DReG − reparam (IWAE k=5) | 2 |" in summary
    assert (root / "study.png").stat().st_size > 0
    # A rerun finds every run done and starts nothing.
    again = subprocess.run([sys.executable, "-m", "launch.sweep", "--sweep=burda_quick",
                            f"--root={root}"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "started" not in again.stdout


def test_study_protocols_and_rows():
    assert {s: sweeps.get(s).config.split(":")[1] for s in
            ("burda_full", "burda_short", "burda_quick")} == {
        "burda_full": "full", "burda_short": "short", "burda_quick": "quick"}
    from experiments.configs import burda
    assert burda.get_config("short").train.num_epochs == 1 + 3 + 9 + 27
    assert burda.get_config("full").train.num_epochs == 3280
    named = sweeps.get("burda_short").named_runs()
    short = [o for _, o in named]
    assert sum(o["loss.num_samples"] == 50 for o in short) == 0  # Their own sweep: ..._k50.
    assert sorted(o["loss.num_samples"] for o in short) == [1] * 4 + [5] * 4
    assert {o["loss.num_samples"] for _, o in sweeps.get("burda_short_k50").named_runs()} == {50}
    # Runs are named by leaf names: the committed runs' directories (flat config) stay theirs.
    assert named[0][0] == "kl=analytic,num_samples=1,num_seeds=3,objective=elbo"
    assert studies.BURDA_STUDY.row_key({"objective": "iwae", "num_samples": 5, "kl": "analytic",
                                        "grad_estimator": "dreg"}) == ("iwae", 5, None, "dreg")


def _study_run(root, name, overrides, config, seeds_ll, images, *, dataset="mnist", eval_k=5000,
               nested=False, launch_config="experiments/configs/burda.py:short"):
    """A finished study run's files, as train_and_evaluate and launch.runs write them: with
    the nested config (`nested`), or the flat one of the runs written before it. Per image,
    the ELBO is 1.5 x the log-likelihood - 5 (so that the two differ between rows)."""
    path = root / name
    path.mkdir()
    config = {"num_epochs": 40, "dataset": dataset, "eval_importance_samples": eval_k,
              "eval_examples": 0, "seed": 0, "grad_estimator": "reparam", "kl": "analytic",
              **config}
    if nested:
        config = vaekl_config.nest(config)
        groups = vaekl_config.groups()
        overrides = {f"{groups[k]}.{k}": v for k, v in overrides.items()}
    (path / "config.json").write_text(json.dumps(config))
    seeds = [{"seed": s, "test_log_likelihood": ll, "test_elbo": 1.5 * ll - 5,
              "test_rate": 20.0 + s, "active_units": 20 + s, "test_log_likelihood_se": 0.1,
              "test_elbo_se": 0.2}
             for s, ll in enumerate(seeds_ll)]
    (path / "results.json").write_text(json.dumps({
        "seeds": seeds, "test_examples": images.shape[-1], "steps": 1000, "train_wall_s": 10.0,
        "total_wall_s": 25.0, "platform": "cpu"}))
    (path / "launch.json").write_text(json.dumps({
        "config": launch_config, "overrides": overrides, "code": "abc", "host": "h",
        "start_time": "t0", "end_time": "t1"}))
    np.savez(path / "per_example.npz", log_likelihood=images.astype(np.float32),
             elbo=(1.5 * images - 5).astype(np.float32))
    return path


def test_study_table_pairs_seeds_and_places_published_figures(tmp_path):
    rng = np.random.default_rng(0)
    a_img = rng.normal(-90, 5, (3, 10000))
    b_img = a_img - 0.5 + rng.normal(0, 1, (3, 10000))  # k1 = analytic - 0.5 + noise, paired.
    a_ll, b_ll = a_img.mean(1), b_img.mean(1)
    row_a = {"kl": "analytic", "objective": "elbo", "num_samples": 1, "num_seeds": 3}
    row_b = {**row_a, "kl": "k1"}
    _study_run(tmp_path, "a", row_a, row_a, a_ll.tolist(), a_img)
    _study_run(tmp_path, "b", row_b, row_b, b_ll.tolist(), b_img, nested=True)
    trial = {**row_a, "eval_examples": 100}
    _study_run(tmp_path, "trial", trial, trial, [-1.0, -1.0, -1.0], a_img[:, :100])
    paths = collect.collect(tmp_path, report=tmp_path / "report")
    assert paths["summary"] == tmp_path / "report.md" and paths["csv"] == tmp_path / "report.csv"
    summary = paths["summary"].read_text()
    rows = {r["row"]: r for r in csv.DictReader(open(paths["csv"]))}
    assert set(rows) == {"VAE k=1, KL analytic", "VAE k=1, KL k1"}  # The trial is left out.
    assert "Left out of the table, overriding eval_examples" in summary and "`trial`" in summary
    analytic = rows["VAE k=1, KL analytic"]
    assert float(analytic["test_log_likelihood_std"]) == pytest.approx(np.std(a_ll, ddof=1))
    assert float(analytic["burda"]) == -86.76 and float(analytic["nbip"]) == -86.35
    assert rows["VAE k=1, KL k1"]["burda"] == ""  # Burda's VAE used the analytic KL.
    assert "converged figures after 3,280 epochs; these rows trained 40" in summary
    # The pair: per-seed differences, their ddof-1 std, the paired SE over images.
    d = a_ll - b_ll
    a32, b32 = a_img.astype(np.float32).astype(np.float64), b_img.astype(np.float32)
    se = np.sqrt(sum(np.var(a32[s] - b32[s], ddof=1) / 10000 for s in range(3))) / 3
    (pair,) = study.differences(studies.BURDA_STUDY,
                                [study.load_run(tmp_path / n) for n in ("a", "b")])
    assert pair["pair"] == "analytic − k1 (VAE k=1)" and pair["n"] == 3
    assert pair["mean"] == pytest.approx(d.mean())
    assert pair["std"] == pytest.approx(np.std(d, ddof=1))
    assert pair["se"] == pytest.approx(se, rel=1e-6)
    assert (f"| analytic − k1 (VAE k=1) | 3 | {d.mean():.2f} | {np.std(d, ddof=1):.2f} (2) |"
            f" {se:.3f} |") in summary
    # The short protocol's rows no run measured, each sweep's with its command.
    assert ("Not run yet, rows of the sweep `burda_short`: VAE k=1, KL k3; VAE k=1, KL stl;"
            " VAE k=5, KL analytic; IWAE k=5, reparam; IWAE k=5, stl; IWAE k=5, dreg.") in summary
    assert "rows of the sweep `burda_short_k50`: VAE k=50, KL analytic;" in summary
    assert (f"Trained by `python -m launch.sweep --sweep=burda_short --root={tmp_path}"
            " --data_dir=DATA_DIR --commit`: 2 row(s) of the sweep `burda_short`.") in summary
    assert "row(s) of the sweep `burda_short_k50`." not in summary  # None of its rows ran.
    assert f"--sweep=burda_short_k50 --root={tmp_path} --data_dir=DATA_DIR --commit" in summary


def test_study_table_has_no_published_figures_off_their_protocol(tmp_path):
    row = {"kl": "analytic", "objective": "elbo", "num_samples": 1, "num_seeds": 2}
    img = np.full((2, 300), -30.0)
    _study_run(tmp_path, "a", row, row, [-30.0, -30.0], img, dataset="digits", eval_k=20)
    summary = collect.collect(tmp_path)["summary"].read_text()
    assert "No published figure" in summary and "Δ Burda" not in summary


CATEGORICAL = "experiments/configs/train.py:categorical"


def _categorical_run(root, gradient, kl, images):
    row = {"categorical_gradient": gradient, "kl": kl, "num_seeds": len(images)}
    return _study_run(root, f"{gradient}-{kl}", row, {**row, "num_epochs": 84}, images.mean(1),
                      images, eval_k=1000, nested=True, launch_config=CATEGORICAL)


def test_categorical_table_has_its_rows_pairs_and_no_published_figure(tmp_path):
    rng = np.random.default_rng(1)
    analytic = rng.normal(-95, 5, (3, 10000))
    relaxed = analytic + 0.3 + rng.normal(0, 1, (3, 10000))  # Paired with analytic, seed by seed.
    _categorical_run(tmp_path, "gumbel", "relaxed", relaxed)
    _categorical_run(tmp_path, "gumbel", "analytic", analytic)
    assert study.study_of(sorted(tmp_path.iterdir())) is studies.CATEGORICAL_STUDY
    paths = collect.collect(tmp_path, report=tmp_path / "report")
    summary = paths["summary"].read_text()
    rows = list(csv.DictReader(open(paths["csv"])))
    # Rows in the sweep's order (analytic first), whatever order the runs were found in.
    assert [r["row"] for r in rows] == ["Gumbel-softmax, KL analytic", "Gumbel-softmax, KL relaxed"]
    assert "burda" not in rows[0] and "active_units_mean" not in rows[0]
    for r, images in zip(rows, (analytic, relaxed)):
        ll = images.mean(1)
        elbo = 1.5 * ll - 5
        assert r["n"] == "3" and float(r["test_elbo_std"]) == pytest.approx(np.std(elbo, ddof=1))
        assert (f"| {r['row']} | 3 | {elbo.mean():.2f} ± {np.std(elbo, ddof=1):.2f} | 0.20 |"
                f" {ll.mean():.2f} ± {np.std(ll, ddof=1):.2f} | 0.10 | 21.00 ± 1.00 |") in summary
    assert ("| row | n | discrete test ELBO | SE | IWAE-1000 log-lik. | SE | rate | seed-steps/s |"
            " train | eval |") in summary
    assert "84 epochs of Jang et al.'s categorical VAE on `mnist`" in summary
    assert "active units" not in summary and "Δ" not in summary and "Burda" not in summary
    assert ("No published figure stands beside these rows: Jang, Gu & Poole (2017,"
            " arXiv:1611.01144) Table 2 could not be read here, and the ~101.5") in summary
    # The pair, in the discrete ELBO: per-seed differences and the paired SE over images.
    e_a, e_r = (1.5 * x.astype(np.float32).astype(np.float64) - 5 for x in (analytic, relaxed))
    d = e_r.mean(1) - e_a.mean(1)
    se = np.sqrt(sum(np.var(e_r[s] - e_a[s], ddof=1) / 10000 for s in range(3))) / 3
    assert "a − b in discrete test ELBO (nats)" in summary
    assert (f"| relaxed − analytic (Gumbel-softmax) | 3 | {d.mean():.2f} |"
            f" {np.std(d, ddof=1):.2f} (2) | {se:.3f} |") in summary
    assert ("Not run yet, rows of the sweep `categorical_vae`: ST Gumbel-softmax, KL analytic;"
            " ST Gumbel-softmax, KL relaxed; score function, KL analytic; score function, KL"
            f" k1. To run them: `python -m launch.sweep --sweep=categorical_vae --root={tmp_path}"
            " --data_dir=DATA_DIR --commit`") in summary
    assert ": 2 row(s) of the sweep `categorical_vae`." in summary


def test_study_of_needs_every_run_from_one_study(tmp_path):
    img = np.full((1, 10), -90.0)
    row = {"kl": "analytic", "objective": "elbo", "num_samples": 1}
    burda = _study_run(tmp_path, "burda", row, row, [-90.0], img)
    categorical = _categorical_run(tmp_path, "gumbel", "analytic", img)
    plain = _study_run(tmp_path, "plain", row, row, [-90.0], img,
                       launch_config="experiments/configs/train.py")
    assert study.study_of([burda]) is studies.BURDA_STUDY  # Any preset of burda.py.
    assert study.study_of([categorical]) is studies.CATEGORICAL_STUDY
    assert study.study_of([burda, categorical]) is None
    assert study.study_of([plain]) is None and study.study_of([]) is None
