"""vaekl.measure: running moments and the jackknife, draws by chunk with one key scheme, the
SNR, gradient draws, seed summaries; each against a direct NumPy computation."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vaekl import measure


def test_moments_merge_chunks_like_one_pass_and_give_standard_errors():
    rng = np.random.default_rng(0)
    x = 3.0 + rng.exponential(size=(200_000, 2))  # Skewed: mu3, mu4 far from normal's.
    m = measure.Moments()
    for chunk in np.array_split(x, [1, 2, 1000, 150_000]):
        m.add(chunk)
    d = x - x.mean(0)
    assert m.n == x.shape[0]
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-12)
    for k, got in ((2, m.m2), (3, m.m3), (4, m.m4)):
        np.testing.assert_allclose(got, np.sum(d**k, 0), rtol=1e-9)
    n = x.shape[0]
    np.testing.assert_allclose(m.mean_se(), x.std(0, ddof=1) / math.sqrt(n), rtol=1e-12)
    # Exponential(1): Var(s^2) = (mu4 - sigma^4) / n + O(1/n^2) = 8 / n.
    np.testing.assert_allclose(m.variance_se(), math.sqrt(8 / n), rtol=0.1)
    np.testing.assert_allclose(m.std_se(), math.sqrt(8 / n) / 2, rtol=0.1)
    # Normal draws: SE(s) is about s / sqrt(2 (n - 1)).
    normal = measure.Moments.of(rng.normal(0.0, 2.0, size=(50_000,)))
    assert float(normal.std_se()) == pytest.approx(2.0 / math.sqrt(2 * 49_999), rel=0.05)
    with pytest.raises(ValueError, match="at least 2 draws, got 1"):
        measure.Moments.of(x[:1]).variance()


def test_jackknife_over_groups_of_one_draw_is_the_classic_standard_error():
    x = np.random.default_rng(1).normal(size=(40, 3))
    groups = [measure.Moments.of(row[None]) for row in x]
    loo = measure.leave_one_out(groups)
    for g, m in enumerate(loo):
        rest = np.delete(x, g, axis=0)
        np.testing.assert_allclose(m.mean, rest.mean(0), rtol=1e-12)
        np.testing.assert_allclose(m.variance(), rest.var(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(measure.merge_all(groups).m2, np.sum((x - x.mean(0)) ** 2, 0),
                               rtol=1e-12)
    # The jackknife SE of a mean is exactly s / sqrt(n).
    se = measure.jackknife_se([float(m.mean[0]) for m in loo])
    assert se == pytest.approx(x[:, 0].std(ddof=1) / math.sqrt(len(x)), rel=1e-10)


def _normal_draws(key, n, dtype):
    """The reference draws: draw i is normal(fold_in(key, i), [3]), computed one by one."""
    return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), (3,), dtype))
                     for i in range(n)])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_draw_i_uses_fold_in_key_i_whatever_the_chunk_and_groups_are_consecutive(dtype):
    key, n = jax.random.key(3), 23
    with jax.enable_x64(dtype == jnp.float64):
        x = _normal_draws(key, n, dtype)
        assert x.dtype == dtype

        def fn(keys):
            return {"x": jax.vmap(lambda k: jax.random.normal(k, (3,), dtype))(keys),
                    "sum": jax.vmap(lambda k: jnp.sum(jax.random.normal(k, (3,), dtype)))(keys)}

        for chunk in (1, 5, 23, 40):  # 5 and 40: a padded last call, its extra rows dropped.
            calls = []
            m = measure.draw_moments(lambda keys: calls.append(keys.shape) or fn(keys), key,
                                     num_draws=n, chunk=chunk, groups=4)
            assert set(calls) == {(chunk,)} and len(calls) == -(-n // chunk)
            total = measure.merge_all(m["x"])
            assert total.n == n
            np.testing.assert_allclose(total.mean, x.astype(np.float64).mean(0), rtol=1e-6,
                                       atol=1e-6)
            np.testing.assert_allclose(total.variance(), x.astype(np.float64).var(0, ddof=1),
                                       rtol=1e-5)
            # Group g holds draws i with i * G // n == g: consecutive runs of draws.
            for g, moments in enumerate(m["sum"]):
                rows = [i for i in range(n) if i * 4 // n == g]
                assert moments.n == len(rows)
                np.testing.assert_allclose(moments.mean, x[rows].sum(1).mean(), rtol=1e-5,
                                           atol=1e-6)


def test_draw_moments_refuses_bad_counts():
    with pytest.raises(ValueError, match="got 0, 5 and 1"):
        measure.draw_moments(lambda keys: {}, jax.random.key(0), num_draws=0, chunk=5)
    with pytest.raises(ValueError, match="got 3, 5 and 4"):
        measure.draw_moments(lambda keys: {}, jax.random.key(0), num_draws=3, chunk=5, groups=4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_snr_is_the_mean_norm_over_the_root_of_the_total_variance(dtype):
    rng = np.random.default_rng(0)
    g = (np.array([1.0, -2.0, 0.5]) + rng.normal(size=(500, 3)) * [1.0, 3.0, 0.1]).astype(dtype)
    m = measure.Moments.of(g)
    g64 = g.astype(np.float64)
    expected = np.linalg.norm(g64.mean(0)) / math.sqrt(np.sum(g64.var(0, ddof=1)))
    assert measure.snr(m) == pytest.approx(expected, rel=1e-12)
    figures = measure.gradient_figures(m, "encoder")
    assert figures["encoder_snr"] == measure.snr(m)
    assert figures["encoder_grad_variance"] == pytest.approx(g64.var(0, ddof=1).mean(), rel=1e-12)
    assert figures["encoder_num_params"] == 3
    assert measure.snr(measure.Moments.of(np.ones((4, 2), dtype))) is None  # No noise: no SNR.


def test_gradient_draws_give_each_parts_gradient_per_key():
    # loss = sum(w * eps) + b * c with eps ~ N(0, I) from the key: d/dw = eps, d/db = c.
    def loss(params, key):
        eps = jax.random.normal(key, (2,))
        return jnp.sum(params["encoder"]["w"] * eps) + params["decoder"]["b"] * 3.0

    params = {"encoder": {"w": jnp.ones(2)}, "decoder": {"b": jnp.asarray(2.0)}}
    keys = jax.random.split(jax.random.key(1), 4)
    out = measure.gradient_draws(loss, lambda g: g)(params, keys)
    eps = np.stack([np.asarray(jax.random.normal(k, (2,))) for k in keys])
    np.testing.assert_allclose(out["encoder"], eps, rtol=1e-6)
    np.testing.assert_allclose(out["decoder"], np.full((4, 1), 3.0))
    np.testing.assert_allclose(out["loss"], eps.sum(1) + 6.0, rtol=1e-6)


def test_seed_summary_is_the_sample_std_with_n():
    values = [-102.637, -102.423, -102.705]
    s = measure.seed_summary(values)
    assert s.n == 3 and s.mean == pytest.approx(np.mean(values), rel=1e-15)
    assert s.std == pytest.approx(np.std(values, ddof=1), rel=1e-12)
    assert s.std == pytest.approx(np.std(values) * math.sqrt(3 / 2), rel=1e-12)  # Not ddof 0.
    assert measure.seed_summary([1.0, None, 3.0]) == (2.0, math.sqrt(2.0), 2)
    assert measure.seed_summary([4.0]) == (4.0, None, 1)  # One seed: no spread.
    assert measure.seed_summary([]) == (None, None, 0)


def test_seed_figures_read_each_seed_of_a_results_file():
    results = {"test_elbo": -2.0, "seeds": [{"test_elbo": -1.0}, {"test_elbo": -3.0}]}
    row = measure.seed_figures(results, ("test_elbo", "test_rate"))
    assert row == {"test_elbo_mean": -2.0, "test_elbo_std": math.sqrt(2.0),
                   "test_elbo_mean_se": 1.0, "test_elbo_seeds": [-1.0, -3.0]}
    one = measure.seed_figures({"test_elbo": -1.5}, ("test_elbo",))
    assert one["test_elbo_std"] is None and one["test_elbo_mean_se"] is None


def test_finished_results_need_the_same_config(tmp_path):
    cfg = ml_collections.ConfigDict({"kl": "k1", "num_epochs": 2})
    assert measure.finished_results(tmp_path, cfg) is None  # Nothing there.
    (tmp_path / "config.json").write_text(cfg.to_json_best_effort())
    (tmp_path / "results.json").write_text('{"test_elbo": -1.0}')
    assert measure.finished_results(tmp_path, cfg) == {"test_elbo": -1.0}
    cfg.num_epochs = 3
    assert measure.finished_results(tmp_path, cfg) is None
