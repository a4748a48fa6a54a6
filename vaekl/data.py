"""Data sets by name, held in memory as float32 arrays.

`load(name, split)` returns a `Dataset`: the examples as one float32 array
`x` of shape [N, D] plus what a model needs to know (`likelihood`, `shape`,
`dim`, whether training binarises it). Training (`vaekl.train`) sends `x` to
the device once and draws each epoch's order there. What is random here is a
pure function of integer seeds.

Data sets (`NAMES`):

* tfds, read from a prepared `data_dir` with `tfds.data_source` (no
  TensorFlow needed to read; never downloaded: prepare them offline with
  `python -m vaekl.prepare`, see `vaekl/prepare.py`):
  - `binarized_mnist`: Larochelle's fixed binarisation; train/validation/test
    of 50000/10000/10000; Bernoulli.
  - `mnist`, `fashion_mnist`: 28x28 grey levels in [0, 1]; train 60000,
    test 10000; Bernoulli with dynamic binarisation (below).
  - `omniglot`: the tfds 105x105 images, ink as 1, box-downsampled to 28x28;
    splits train/test/small1/small2; dynamic binarisation.
* embedded, no files needed:
  - `digits`: scikit-learn's 8x8 digits / 16; a seeded 1497/300 train/test
    split; dynamic binarisation.
  - `linear_gaussian`: draws from the model of `vaekl.linear_gaussian`
    (d=20, k=5, s=0.5; 5000 train, 1000 test by default); Gaussian. The model
    rides along as `Dataset.model` for the exact log p(x) and p(z | x).
* from a local file: `frey_face` (`path=` to `frey_rawface.mat`): 1965 faces
  of 28x20 / 255, the last 200 of a seeded permutation as test; Gaussian.

Dynamic binarisation (the IWAE protocol): the training split of a grey-level
data set keeps its intensities in `x` (`dynamic_binarization` is set), and
each train step draws its batch's pixels anew as Bernoulli(intensity) from the
step's key (`vaekl.steps.make_epoch_fn`). Its other splits are binarised once
at load time from `load`'s `seed`, so evaluation always sees the same bits.
"""

import dataclasses
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from vaekl import linear_gaussian, validate

BERNOULLI = "bernoulli"
GAUSSIAN = "gaussian"
PREPARE_MODULE = "vaekl.prepare"


class UnpreparedDatasetError(FileNotFoundError):
    """A tfds data set is not prepared in the data_dir (it is never downloaded)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a data set, in memory.

    Attributes:
      name: the data set's name (one of `NAMES`).
      split: the split's name (one of `splits(name)`).
      x: the examples, float32 [N, D]. In [0, 1] for Bernoulli data; for a
        dynamically binarised split, the pixel intensities.
      likelihood: `BERNOULLI` or `GAUSSIAN`, the decoder the data calls for.
      shape: the shape of one example, e.g. (28, 28, 1); its product is D.
      dynamic_binarization: whether training binarises `x` anew at every step
        (in `vaekl.train`).
      labels: int64 [N] class labels, or None where the data set has none.
      model: the generating `LinearGaussian` for `linear_gaussian`, else None.
    """

    name: str
    split: str
    x: np.ndarray
    likelihood: str
    shape: tuple[int, ...]
    dynamic_binarization: bool = False
    labels: np.ndarray | None = None
    model: linear_gaussian.LinearGaussian | None = None

    def __post_init__(self):
        if self.x.ndim != 2 or self.x.dtype != np.float32:
            raise ValueError(f"x must be float32 [N, D], got {self.x.dtype} {self.x.shape}")
        if np.prod(self.shape) != self.x.shape[1]:
            raise ValueError(f"shape {self.shape} does not hold D={self.x.shape[1]} features")
        self.x.setflags(write=False)  # Shared by every epoch: never to be changed in place.

    @property
    def dim(self) -> int:
        """D, the number of features of one example."""
        return self.x.shape[1]

    def __len__(self) -> int:
        return self.x.shape[0]


_IMAGE_SIZE = 28  # Every tfds data set here comes out as 28x28x1 images.
_READ_CHUNK = 4096  # Examples decoded at a time: bounds memory for omniglot.


def _bits(images: np.ndarray) -> np.ndarray:
    """uint8 [n, 28, 28, 1] of 0/1 -> float32 [n, 784] of 0/1."""
    return images.reshape(len(images), -1).astype(np.float32)


def _grey_levels(images: np.ndarray) -> np.ndarray:
    """uint8 [n, 28, 28, 1] grey levels 0..255 -> float32 [n, 784] in [0, 1]."""
    return _bits(images) / 255.0


def _omniglot_ink(images: np.ndarray) -> np.ndarray:
    """Omniglot uint8 [n, H, W, 3], black ink on white -> ink in [0, 1], float32 [n, 784].

    Each image is area-downsampled to 28x28: an output pixel is the mean ink
    over the part of the input that it covers (exactly, fractional pixels
    included).
    """
    ink = 1.0 - images[..., 0].astype(np.float32) / 255.0
    rows = _area_matrix(ink.shape[1], _IMAGE_SIZE)
    cols = _area_matrix(ink.shape[2], _IMAGE_SIZE)
    return (rows @ ink @ cols.T).reshape(len(images), _IMAGE_SIZE**2)


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of area-averaging n_in pixels into n_out; rows sum to 1."""
    edges = np.linspace(0.0, n_in, n_out + 1)  # Output cell edges, in input pixels.
    left = np.arange(n_in)
    overlap = np.minimum(edges[1:, None], left + 1) - np.maximum(edges[:-1, None], left)
    return (np.clip(overlap, 0.0, None) * (n_out / n_in)).astype(np.float32)


class _TfdsSpec(NamedTuple):
    splits: tuple[str, ...]
    to_x: Callable[[np.ndarray], np.ndarray]  # uint8 images [n, ...] -> float32 [n, 784].
    grey: bool  # Grey levels: binarised dynamically (train) or once (others).
    manual_dir: str  # A --manual_dir for the prepare command.
    manual_files: str  # What that folder must hold.


_MNIST_FILES = (
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
)
_TFDS = {
    "binarized_mnist": _TfdsSpec(
        ("train", "validation", "test"),
        _bits,
        False,
        "../shared/data/binarized_mnist",
        "binarized_mnist_{train,valid,test}.amat, or binarized_mnist.npz and write_amat.py",
    ),
    "mnist": _TfdsSpec(("train", "test"), _grey_levels, True, "../shared/data/mnist", _MNIST_FILES),
    "fashion_mnist": _TfdsSpec(("train", "test"), _grey_levels, True, "MANUAL_DIR", _MNIST_FILES),
    "omniglot": _TfdsSpec(
        ("train", "test", "small1", "small2"),
        _omniglot_ink,
        True,
        "MANUAL_DIR",
        "images_background.zip, images_evaluation.zip, images_background_small{1,2}.zip",
    ),
}
_EMBEDDED_SPLITS = ("train", "test")
_OPTIONS = {  # The keyword options of `load`, by data set.
    "linear_gaussian": ("obs_dim", "latent_dim", "noise_std", "model_seed", "num_train",
                        "num_test"),
}
NAMES = tuple(sorted([*_TFDS, "digits", "frey_face", "linear_gaussian"]))
TFDS_NAMES = tuple(sorted(_TFDS))
_DIGITS_NUM_TEST = 300
_FREY_SHAPE = (28, 20, 1)
_FREY_NUM_TEST = 200
_RAW_SUFFIXES = (".npz", ".amat", ".gz", ".zip", ".mat")  # Files a --manual_dir holds.


def splits(name: str) -> tuple[str, ...]:
    """The split names of data set `name` (one of `NAMES`)."""
    validate.choice("vaekl.data.splits", "name", name, NAMES)
    return _TFDS[name].splits if name in _TFDS else _EMBEDDED_SPLITS


def load(
    name: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
    seed: int = 0,
    **options,
) -> Dataset:
    """Loads one split of a data set into memory.

    Args:
      name: the data set, one of `NAMES`.
      split: one of `splits(name)`.
      data_dir: tfds data folder where the tfds data sets were prepared
        (default $TFDS_DATA_DIR, else ~/tensorflow_datasets); other data sets
        ignore it.
      path: the `frey_rawface.mat` file, required by `frey_face`; other data sets
        ignore it.
      seed: seed (>= 0) of the data set's own fixed randomness: the one-off
        binarisation of evaluation splits, the digits and frey_face train/test
        splits, the linear_gaussian draws. Keep it fixed to compare runs; the
        training randomness is `config.train.seed`'s (`vaekl.train`).
      **options: for `linear_gaussian` only: obs_dim (20), latent_dim (5),
        noise_std (0.5), model_seed (0, the seed of W and b), num_train (5000),
        num_test (1000).

    Returns:
      The split, with x float32 [N, D].

    Raises:
      ValueError: unknown name or split, or a negative seed.
      TypeError: an option the data set does not take, or a seed that is not an int.
      UnpreparedDatasetError: a tfds data set not prepared in data_dir.
      FileNotFoundError: frey_face without an existing `path`.
    """
    validate.choice("vaekl.data.load", "name", name, NAMES)
    validate.choice(f"vaekl.data.load({name!r})", "split", split, splits(name))
    seed = validate.nonnegative_int("vaekl.data.load", "seed", seed)
    allowed = _OPTIONS.get(name, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"load({name!r}) got unknown options {unknown} (config.data.data_options); it takes "
            f"{list(allowed) if allowed else 'none'}"
        )
    if name in _TFDS:
        return _load_tfds(name, split, resolve_data_dir(data_dir), seed)
    if name == "digits":
        return _load_digits(split, seed)
    if name == "frey_face":
        return _load_frey_face(split, path, seed)
    return _load_linear_gaussian(split, seed, **options)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The tfds data folder: data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    return Path(data_dir).expanduser().resolve()


def prepare_command(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The shell command (run from the repository root) that prepares tfds data set `name`."""
    validate.choice("vaekl.data.prepare_command", "name", name, TFDS_NAMES)
    return (
        f"python -m {PREPARE_MODULE} --dataset={name} "
        f"--manual_dir={_TFDS[name].manual_dir} --data_dir={resolve_data_dir(data_dir)}"
    )


def _load_tfds(name: str, split: str, data_dir: Path, seed: int) -> Dataset:
    import tensorflow_datasets as tfds  # Lazy: heavy, and only for these data sets.

    spec = _TFDS[name]
    version = tfds.builder_cls(name).VERSION
    if not (data_dir / name / str(version) / "dataset_info.json").is_file():
        raw = sorted(p.name for p in data_dir.glob("*") if p.suffix in _RAW_SUFFIXES)
        if raw:
            raise UnpreparedDatasetError(
                f"data_dir (config.data.data_dir) {str(data_dir)!r} holds raw files ("
                f"{', '.join(raw[:3])}), not prepared tfds data: raw files are the "
                f"--manual_dir of `python -m {PREPARE_MODULE}`; data_dir must be a different "
                f"folder, the --data_dir it writes the prepared tfds data into. From the "
                f"repository root:\n"
                f"  python -m {PREPARE_MODULE} --dataset={name} --manual_dir={data_dir} "
                f"--data_dir=DATA_DIR\nthen pass data_dir=DATA_DIR"
                f" (--config.data.data_dir=DATA_DIR)."
            )
        raise UnpreparedDatasetError(
            f"tfds data set {name!r} (version {version}) is not prepared in data_dir "
            f"(config.data.data_dir) {str(data_dir)!r}, and it is never downloaded. Prepare it "
            f"offline (needs tensorflow-cpu), from the repository root:\n"
            f"  {prepare_command(name, data_dir)}\n"
            f"where --manual_dir holds {spec.manual_files}."
        )
    cache = data_dir / name / str(version) / f"vaekl-{split}.npz"
    if cache.is_file():
        with np.load(cache) as arrays:
            x, labels = arrays["x"], arrays["labels"] if "labels" in arrays else None
    else:
        source = tfds.data_source(name, split=split, data_dir=os.fspath(data_dir), download=False)
        x, labels = _decode(spec, source)
        _write_cache(cache, x, labels)
    shape = (_IMAGE_SIZE, _IMAGE_SIZE, 1)
    return _binarized_dataset(name, split, x, shape, labels, spec.grey, seed)


def _decode(spec, source):
    """(x [N, 784], labels [N] or None) from a tfds data source of a prepared split."""
    xs, labels = [], []
    for start in range(0, len(source), _READ_CHUNK):
        # One batched read (array_record's __getitems__) is ~2x faster than a loop.
        examples = source.__getitems__(range(start, min(start + _READ_CHUNK, len(source))))
        xs.append(spec.to_x(np.stack([example["image"] for example in examples])))
        labels.extend(example.get("label") for example in examples)
    labels = np.array(labels, dtype=np.int64) if labels[0] is not None else None
    return np.concatenate(xs), labels


def _write_cache(path: Path, x: np.ndarray, labels: np.ndarray | None) -> None:
    """Keeps the decoded split beside the tfds files (reading it back takes ~0.1 s, decoding
    the records ~5 s). Best effort: a read-only data_dir just goes without."""
    arrays = {"x": x} if labels is None else {"x": x, "labels": labels}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def _load_digits(split: str, seed: int) -> Dataset:
    from sklearn.datasets import load_digits  # Lazy: scikit-learn is slow to import.

    digits = load_digits()
    order = _rng(seed, "split", "digits").permutation(len(digits.data))
    test = np.sort(order[:_DIGITS_NUM_TEST])
    rows = test if split == "test" else np.sort(order[_DIGITS_NUM_TEST:])
    x = digits.data[rows].astype(np.float32) / 16.0
    labels = digits.target[rows].astype(np.int64)
    return _binarized_dataset("digits", split, x, (8, 8, 1), labels, True, seed)


def _load_frey_face(split: str, path: str | os.PathLike | None, seed: int) -> Dataset:
    if path is None:
        raise FileNotFoundError(
            "frey_face needs path= (config.data.data_path): the path of frey_rawface.mat (in this "
            "project: ../shared/data/frey/frey_rawface.mat from the repository root)"
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"frey_face: path (config.data.data_path) {str(path)!r} is not a file; expected the "
            "path of frey_rawface.mat"
        )
    import scipy.io  # Lazy: only frey_face needs it.

    faces = scipy.io.loadmat(path)["ff"].T  # [1965, 560], one row-major 28x20 face per row.
    order = _rng(seed, "split", "frey_face").permutation(len(faces))
    rows = order[-_FREY_NUM_TEST:] if split == "test" else order[:-_FREY_NUM_TEST]
    x = faces[np.sort(rows)].astype(np.float32) / 255.0
    return Dataset(name="frey_face", split=split, x=x, likelihood=GAUSSIAN, shape=_FREY_SHAPE)


def _load_linear_gaussian(
    split: str,
    seed: int,
    *,
    obs_dim: int = 20,
    latent_dim: int = 5,
    noise_std: float = 0.5,
    model_seed: int = 0,
    num_train: int = 5000,
    num_test: int = 1000,
) -> Dataset:
    fn_name = "vaekl.data.load('linear_gaussian')"
    model_seed = validate.nonnegative_int(fn_name, "model_seed", model_seed)
    model = linear_gaussian.make_model(obs_dim, latent_dim, noise_std, model_seed)
    num = num_test if split == "test" else num_train
    validate.positive_int(fn_name, f"num_{split}", num)
    x, _ = linear_gaussian.sample(model, num, _rng(seed, "linear_gaussian", split))
    return Dataset(name="linear_gaussian", split=split, x=x.astype(np.float32),
                   likelihood=GAUSSIAN, shape=(obs_dim,), model=model)


def _binarized_dataset(name: str, split: str, x: np.ndarray, shape: tuple[int, ...],
                       labels: np.ndarray | None, grey: bool, seed: int) -> Dataset:
    """A Bernoulli data set; grey levels are binarised in training (train), else here once."""
    dynamic = grey and split == "train"
    if grey and not dynamic:  # One Bernoulli(x) draw per pixel.
        uniform = _rng(seed, "binarize", name, split).random(x.shape, dtype=np.float32)
        x = (uniform < x).astype(np.float32)
    return Dataset(name=name, split=split, x=x, likelihood=BERNOULLI, shape=shape,
                   dynamic_binarization=dynamic, labels=labels)


def _rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A generator that is a pure function of seed and keys (ints >= 0 or strings)."""
    words = [zlib.crc32(key.encode()) if isinstance(key, str) else key for key in keys]
    return np.random.default_rng([seed, *words])

