"""Tests of vaekl.data, vaekl.linear_gaussian and vaekl.prepare."""

import gzip
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from vaekl import data, linear_gaussian, prepare

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
HAS_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None
needs_tensorflow = pytest.mark.skipif(
    not HAS_TENSORFLOW, reason="preparing a tfds data set needs TensorFlow (tensorflow-cpu)"
)


def _shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    return path


def _sorted_rows(images: np.ndarray) -> list[bytes]:
    """The rows of a uint8 [N, ...] array as a sorted list (order-free comparison)."""
    return sorted(map(bytes, images.reshape(len(images), -1)))


# ---------------------------------------------------------------- import cost


def test_import_does_not_load_tensorflow():
    code = (
        "import sys, vaekl.data, vaekl.prepare; "
        "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- embedded data


@pytest.mark.parametrize(
    "name, split, size, shape, likelihood",
    [
        ("digits", "train", 1497, (8, 8, 1), data.BERNOULLI),
        ("digits", "test", 300, (8, 8, 1), data.BERNOULLI),
        ("linear_gaussian", "train", 5000, (20,), data.GAUSSIAN),
        ("linear_gaussian", "test", 1000, (20,), data.GAUSSIAN),
    ],
)
def test_embedded_metadata_and_shapes(name, split, size, shape, likelihood):
    ds = data.load(name, split)
    assert (ds.name, ds.split, ds.likelihood, ds.shape) == (name, split, likelihood, shape)
    assert ds.x.shape == (size, int(np.prod(shape)))
    assert ds.x.dtype == np.float32
    assert len(ds) == size and ds.dim == int(np.prod(shape))
    assert np.all(np.isfinite(ds.x))
    assert not ds.x.flags.writeable


def test_digits_split_covers_sklearn_digits_once():
    from sklearn.datasets import load_digits

    train, test = data.load("digits", "train"), data.load("digits", "test")
    assert train.dynamic_binarization and not test.dynamic_binarization
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0
    # The train intensities are sklearn's rows / 16; test + train labels are all of them.
    reference = load_digits()
    assert set(map(bytes, train.x)) <= set(map(bytes, reference.data.astype(np.float32) / 16))
    labels = np.concatenate([train.labels, test.labels])
    np.testing.assert_array_equal(np.bincount(labels), np.bincount(reference.target))


def test_fixed_test_binarisation_is_fixed_and_seeded():
    first, again = data.load("digits", "test"), data.load("digits", "test")
    np.testing.assert_array_equal(first.x, again.x)
    assert set(np.unique(first.x)) == {0.0, 1.0}
    other_seed = data.load("digits", "test", seed=1)
    assert not np.array_equal(first.x, other_seed.x)


def test_linear_gaussian_data_matches_its_model():
    train, test = data.load("linear_gaussian", "train"), data.load("linear_gaussian", "test")
    model = train.model
    assert model.w.shape == (20, 5) and model.b.shape == (20,) and model.noise_std == 0.5
    np.testing.assert_array_equal(model.w, test.model.w)
    np.testing.assert_array_equal(model.w, linear_gaussian.make_model().w)
    assert not np.array_equal(train.x[:1000], test.x)
    cov = np.asarray(linear_gaussian.marginal_cov(model))
    mean_error = np.sqrt(cov.diagonal().max() / 5000)  # Standard error of the sample mean.
    np.testing.assert_allclose(train.x.mean(0), model.b, atol=5 * mean_error)
    np.testing.assert_allclose(np.cov(train.x.T), cov, atol=0.15 * cov.diagonal().max())
    small = data.load("linear_gaussian", "test", obs_dim=3, latent_dim=2, num_test=7)
    assert small.x.shape == (7, 3) and small.model.w.shape == (3, 2)


# ---------------------------------------------------------------- linear-Gaussian maths


@pytest.fixture(scope="module")
def model_and_x():
    model = linear_gaussian.make_model(obs_dim=6, latent_dim=3, noise_std=0.7, seed=2)
    x, _ = linear_gaussian.sample(model, 50, np.random.default_rng(0))
    return model, x


def test_log_marginal_matches_scipy(model_and_x):
    model, x = model_and_x
    cov = model.w @ model.w.T + model.noise_std**2 * np.eye(model.obs_dim)
    expected = scipy.stats.multivariate_normal(model.b, cov).logpdf(x)
    got = np.asarray(linear_gaussian.log_marginal(model, x))
    assert got.shape == (50,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    # Batch dimensions are kept.
    assert linear_gaussian.log_marginal(model, x.reshape(5, 10, 6)).shape == (5, 10)


def test_per_dimension_noise_matches_scipy_and_conditioning():
    model = linear_gaussian.make_model(obs_dim=6, latent_dim=3, seed=4)
    model = model._replace(noise_std=np.linspace(0.3, 1.2, 6))
    x, _ = linear_gaussian.sample(model, 40, np.random.default_rng(1))
    sxx = model.w @ model.w.T + np.diag(model.noise_std**2)
    expected = scipy.stats.multivariate_normal(model.b, sxx).logpdf(x)
    np.testing.assert_allclose(linear_gaussian.log_marginal(model, x), expected, rtol=1e-5,
                               atol=1e-4)
    gain = np.linalg.solve(sxx, model.w).T  # W^T Sxx^-1, [k, d].
    post = linear_gaussian.posterior(model, x)
    np.testing.assert_allclose(post.mean, (x - model.b) @ gain.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(post.covariance(), np.eye(3) - gain @ model.w, rtol=1e-4,
                               atol=1e-5)


def test_posterior_matches_joint_gaussian_conditioning(model_and_x):
    model, x = model_and_x
    # Independently: (z, x) is jointly Gaussian with cov [[I, W^T], [W, W W^T + s^2 I]].
    sxx = model.w @ model.w.T + model.noise_std**2 * np.eye(model.obs_dim)
    gain = np.linalg.solve(sxx, model.w).T  # W^T Sxx^-1, [k, d].
    mean = (x - model.b) @ gain.T
    cov = np.eye(model.latent_dim) - gain @ model.w
    post = linear_gaussian.posterior(model, x)
    np.testing.assert_allclose(post.mean, mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(post.covariance(), cov, rtol=1e-4, atol=1e-5)
    tril = np.asarray(post.scale_tril)
    np.testing.assert_allclose(tril @ tril.T, cov, rtol=1e-4, atol=1e-5)
    assert np.allclose(tril, np.tril(tril))


def test_posterior_and_evidence_match_bayes_rule_on_a_grid():
    model = linear_gaussian.make_model(obs_dim=1, latent_dim=1, noise_std=0.8, seed=5)
    x = np.array([1.3])
    z = np.linspace(-12.0, 12.0, 200_001)
    dz = z[1] - z[0]
    joint = scipy.stats.norm.pdf(z) * scipy.stats.norm.pdf(
        x[0], model.w[0, 0] * z + model.b[0], model.noise_std
    )
    evidence = joint.sum() * dz
    mean = (z * joint).sum() * dz / evidence
    var = ((z - mean) ** 2 * joint).sum() * dz / evidence
    post = linear_gaussian.posterior(model, x)
    np.testing.assert_allclose(float(post.mean[0]), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(post.covariance()[0, 0]), var, rtol=1e-4)
    log_evidence = float(linear_gaussian.log_marginal(model, x))
    np.testing.assert_allclose(log_evidence, np.log(evidence), atol=1e-4)


# ---------------------------------------------------------------- bad input


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown name 'mnsit'; expected one of .*'digits'"):
        data.load("mnsit")


def test_bad_split_names_the_splits():
    expected = r"load\('digits'\): unknown split 'validation'; expected one of \('train', 'test'\)"
    with pytest.raises(ValueError, match=expected):
        data.load("digits", "validation")


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_seed_is_refused(seed, error):
    with pytest.raises(error, match=r"vaekl.data.load: `seed` must be (an int )?>= 0"):
        data.load("digits", seed=seed)


def test_unknown_option_is_refused():
    with pytest.raises(TypeError, match=r"load\('digits'\) got unknown options \['obs_dim'\]"):
        data.load("digits", obs_dim=3)
    with pytest.raises(TypeError, match="unknown options.*takes.*latent_dim"):
        data.load("linear_gaussian", latent=3)


def test_frey_face_needs_an_existing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="frey_face needs path="):
        data.load("frey_face")
    with pytest.raises(FileNotFoundError, match="nothing.mat"):
        data.load("frey_face", path=tmp_path / "nothing.mat")


def test_unprepared_tfds_dataset_fails_at_once(tmp_path):
    start = time.monotonic()
    with pytest.raises(data.UnpreparedDatasetError) as info:
        data.load("mnist", "train", data_dir=tmp_path)
    assert time.monotonic() - start < 60  # Loose: a download attempt would hang ~200 s.
    message = str(info.value)
    assert "'mnist'" in message and str(tmp_path.resolve()) in message
    command = (
        "python -m vaekl.prepare --dataset=mnist --manual_dir=../shared/data/mnist "
        f"--data_dir={tmp_path.resolve()}"
    )
    assert command in message
    assert isinstance(info.value, FileNotFoundError)


@needs_tensorflow
def test_prepare_refuses_missing_manual_files(tmp_path):
    with pytest.raises(prepare.MissingManualFilesError, match="train-images-idx3-ubyte.gz"):
        prepare.prepare("fashion_mnist", manual_dir=tmp_path, data_dir=tmp_path / "tfds")


def test_omniglot_ink_is_area_coverage():
    white = np.full((1, 105, 105, 3), 255, np.uint8)
    half = white.copy()
    half[:, :, :52] = 0  # Left 52 columns inked: 52 / 105 of the area.
    ink = data._omniglot_ink(np.concatenate([white, half]))
    assert ink.shape == (2, 784) and ink.dtype == np.float32
    assert np.all(ink[0] == 0.0)
    np.testing.assert_allclose(ink[1].mean(), 52 / 105, atol=1e-5)


# ---------------------------------------------------------------- Frey Face


def test_frey_face_from_shared_file():
    path = _shared("frey", "frey_rawface.mat")
    train = data.load("frey_face", "train", path=path)
    test = data.load("frey_face", "test", path=path)
    assert (train.x.shape, test.x.shape) == ((1765, 560), (200, 560))
    assert train.shape == (28, 20, 1) and train.likelihood == data.GAUSSIAN
    both = np.concatenate([train.x, test.x])
    assert 8 / 255 - 1e-6 <= both.min() and both.max() <= 238 / 255 + 1e-6
    np.testing.assert_allclose(both.mean() * 255, 154.46, atol=0.01)
    np.testing.assert_array_equal(test.x, data.load("frey_face", "test", path=path).x)


# ---------------------------------------------------------------- tfds, prepared from local files


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def _prepared(name: str, tfds_dir: Path) -> Path:
    """tfds_dir with `name` prepared from ../shared/data/<name> (skips without TensorFlow)."""
    if not HAS_TENSORFLOW:
        pytest.skip("preparing a tfds data set needs TensorFlow (tensorflow-cpu)")
    prepare.prepare(name, manual_dir=_shared(name), data_dir=tfds_dir)
    return tfds_dir


@pytest.fixture(scope="module")
def mnist_dir(tfds_dir):
    return _prepared("mnist", tfds_dir)


@pytest.fixture(scope="module")
def binarized_mnist_dir(tfds_dir):
    return _prepared("binarized_mnist", tfds_dir)


def _idx(path: Path, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8, offset=offset)


def test_mnist_prepared_from_local_files(mnist_dir):
    train = data.load("mnist", "train", data_dir=mnist_dir)
    test = data.load("mnist", "test", data_dir=mnist_dir)
    assert (train.x.shape, test.x.shape) == ((60000, 784), (10000, 784))
    assert train.shape == (28, 28, 1) and train.likelihood == data.BERNOULLI
    assert train.dynamic_binarization and not test.dynamic_binarization
    np.testing.assert_allclose(train.x.mean(), 0.1307, atol=1e-4)
    np.testing.assert_allclose(train.x.std(), 0.3081, atol=1e-4)
    assert set(np.unique(test.x)) == {0.0, 1.0}
    np.testing.assert_allclose(test.x.mean(), 0.1325, atol=2e-3)  # One Bernoulli draw.
    counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    np.testing.assert_array_equal(np.bincount(train.labels), counts)
    # tfds stores the examples shuffled: compare the images as a multiset.
    raw = _idx(_shared("mnist", "train-images-idx3-ubyte.gz"), 16).reshape(60000, 784)
    assert _sorted_rows(np.rint(train.x * 255).astype(np.uint8)) == _sorted_rows(raw)


def test_prepare_command_line_is_a_no_op_when_prepared(mnist_dir, capsys):
    argv = ["--dataset=mnist", f"--manual_dir={_shared('mnist')}", f"--data_dir={mnist_dir}"]
    prepare.main(argv)
    assert f"mnist is prepared in {mnist_dir}" in capsys.readouterr().out


def test_binarized_mnist_prepared_from_local_files(binarized_mnist_dir):
    npz = np.load(_shared("binarized_mnist", "binarized_mnist.npz"))
    for split, key, size, mean in [
        ("train", "train", 50000, 0.13056),
        ("validation", "valid", 10000, 0.13113),
        ("test", "test", 10000, 0.13251),
    ]:
        ds = data.load("binarized_mnist", split, data_dir=binarized_mnist_dir)
        assert ds.x.shape == (size, 784) and ds.labels is None
        assert not ds.dynamic_binarization and ds.likelihood == data.BERNOULLI
        assert set(np.unique(ds.x)) == {0.0, 1.0}
        np.testing.assert_allclose(ds.x.mean(), mean, atol=1e-5)
        assert _sorted_rows(ds.x.astype(np.uint8)) == _sorted_rows(npz[key])
