"""The study end to end: the `burda_quick` sweep (real subprocesses), then `launch.collect`."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from launch import study, sweeps

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
    assert "beside Burda et al.'s Table 1" in summary
    rows = list(csv.DictReader(open(root / "study.csv")))
    labels = [r["row"] for r in rows]
    assert labels == ["VAE k=1, KL analytic", "VAE k=1, KL k1", "VAE k=1, KL k3",
                      "VAE k=1, KL stl", "VAE k=5, KL analytic", "IWAE k=5, dreg",
                      "IWAE k=5, reparam", "IWAE k=5, stl"]
    for r in rows:
        assert int(r["n"]) == (3 if r["num_samples"] == "1" else 2)
        ll, std = float(r["test_log_likelihood_mean"]), float(r["test_log_likelihood_std"])
        assert ll < 0 and std >= 0 and f"| {r['row']} | {r['n']} | {ll:.2f} ± {std:.2f}" in summary
    vae = next(r for r in rows if r["row"] == "VAE k=1, KL analytic")
    assert float(vae["burda"]) == -86.76
    assert float(vae["diff_burda"]) == float(vae["test_log_likelihood_mean"]) + 86.76
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
    assert burda.get_config("short").num_epochs == 1 + 3 + 9 + 27
    assert burda.get_config("full").num_epochs == 3280
    short = [o for _, o in sweeps.get("burda_short").named_runs()]
    assert sum(o["num_samples"] == 50 for o in short) == 3
    assert study.row_key({"objective": "iwae", "num_samples": 5, "kl": "analytic",
                          "grad_estimator": "dreg"}) == ("iwae", 5, None, "dreg")
