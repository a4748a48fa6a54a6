"""The bound_snr experiment end to end on its quick config (digits, few draws)."""

import json

import pytest

from experiments import bound_snr
from experiments.configs import bound_snr as bound_snr_config


@pytest.mark.slow  # About a minute: in CI's slow pass.
def test_quick_bound_snr_writes_rows_slopes_and_bias(tmp_path):
    config = bound_snr_config.get_config("quick")
    config.toy_draws, config.vae_draws, config.bias_draws = 300, 30, 300
    config.vae_num_importance = (1, 3)
    bound_snr.run(config, str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    models = {(r["model"], r["checkpoint"]) for r in results["rows"]}
    assert models == {("gaussian_toy", "perturbation=0.1"), ("gaussian_toy", "perturbation=0.01"),
                      ("vae", "init"), ("vae", "epochs=1")}
    for r in results["rows"]:
        assert r["snr_floor"] == 1 / r["num_draws"] ** 0.5
        assert r["below_floor"] == (r["snr_median"] < 5 * r["snr_floor"])
    # The decoder's gradient is the same under every estimator, so is its SNR.
    dec = {}
    for r in results["rows"]:
        if r["network"] == "decoder":
            dec.setdefault((r["model"], r["checkpoint"], r["num_importance"]), set()).add(
                round(r["snr_median"], 6))
    assert all(len(v) == 1 for v in dec.values())
    bias = {(b["estimator"], b["num_importance"], b["group"]): b for b in results["bias"]}
    assert all(bias[(e, k, "decoder.mu")]["equal_to_rounding"] for e in ("stl", "dreg")
               for k in config.bias_ks)
    assert bias[("stl", 10, "encoder.b")]["t"] > 6  # STL-IWAE is biased for K > 1 ...
    assert bias[("dreg", 10, "encoder.b")]["t"] < 4.5  # ... DReG is not.
    assert (tmp_path / "bound_snr.png").stat().st_size > 0


def test_slopes_fit_k10_and_above_and_leave_out_rows_below_the_floor():
    rows = [{"model": "m", "checkpoint": "c", "estimator": "dreg", "network": "encoder",
             "num_importance": k, "snr_median": 2.0 * k**0.5, "below_floor": False}
            for k in (1, 10, 100, 1000)]
    rows.append(dict(rows[-1], num_importance=3000, snr_median=1e-9, below_floor=True))
    rows[0]["snr_median"] = 1e6  # K < 10: not fitted.
    slope = bound_snr.fit_slopes(rows)["m/c"]["dreg"]["encoder"]
    assert abs(slope - 0.5) < 1e-9
