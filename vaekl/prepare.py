"""Prepares a tfds data set offline, from local files, for `vaekl.data.load`.

Usage (from the repository root; needs tensorflow-cpu, the `prepare` extra):

    python -m vaekl.prepare --dataset=mnist \\
        --manual_dir=../shared/data/mnist --data_dir=DATA_DIR
    python -m vaekl.prepare --dataset=binarized_mnist \\
        --manual_dir=../shared/data/binarized_mnist --data_dir=DATA_DIR

then `vaekl.data.load("mnist", "train", data_dir=DATA_DIR)`. Without
--data_dir the data goes to $TFDS_DATA_DIR, else ~/tensorflow_datasets.

The tfds download manager takes a file from the manual dir when the file
carries the name that tfds registers for the URL (checked against the
registered checksum), so the builders run unchanged and never reach the
network: every such file is checked to be there before anything starts. For
`binarized_mnist`, a folder holding `binarized_mnist.npz` and `write_amat.py`
(as in ../shared/data/binarized_mnist) is accepted too: the `.amat` files tfds
reads are written from it to a temporary folder first. The data is written in
the array_record format that `tfds.data_source` reads. Preparing takes about
20 s for mnist and 40 s for binarized_mnist on a CPU.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from vaekl import data

_AMAT_SCRIPT = "write_amat.py"
_AMAT_SOURCE = "binarized_mnist.npz"


class MissingManualFilesError(FileNotFoundError):
    """The manual dir lacks files the builder would otherwise download."""


def prepare(
    name: str, *, manual_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None
) -> Path:
    """Prepares tfds data set `name` in data_dir from the files in manual_dir.

    Does nothing if the data set is already prepared there.

    Args:
      name: one of `vaekl.data.TFDS_NAMES`.
      manual_dir: folder with the files tfds would download (see the module doc).
      data_dir: tfds data folder (see `vaekl.data.resolve_data_dir`).

    Returns:
      The prepared folder, data_dir/name/version.

    Raises:
      ValueError: unknown name.
      ModuleNotFoundError: TensorFlow is not installed.
      MissingManualFilesError: manual_dir lacks a file, which would be downloaded.
    """
    if name not in data.TFDS_NAMES:
        raise ValueError(f"dataset must be one of {list(data.TFDS_NAMES)}, got {name!r}")
    if importlib.util.find_spec("tensorflow") is None:
        raise ModuleNotFoundError(
            "preparing a tfds data set needs TensorFlow: pip install tensorflow-cpu "
            "(or the project's `prepare` extra); reading it later does not"
        )
    import tensorflow_datasets as tfds  # Lazy: heavy.

    builder = tfds.builder(name, data_dir=os.fspath(data.resolve_data_dir(data_dir)))
    if builder.is_prepared():
        return Path(builder.data_dir)
    manual_dir = Path(manual_dir).expanduser().resolve()
    with tempfile.TemporaryDirectory(prefix="vaekl_prepare_") as tmp:
        tmp = Path(tmp)
        if name == "binarized_mnist" and (manual_dir / _AMAT_SOURCE).is_file():
            manual_dir = _write_amat(manual_dir, tmp / "amat")
        wanted = sorted({info.filename for info in (builder.url_infos or {}).values()})
        missing = [f for f in wanted if not (manual_dir / f).is_file()]
        if missing or not wanted:
            raise MissingManualFilesError(
                f"manual_dir {str(manual_dir)!r} lacks {missing} for {name!r}; "
                "they would be downloaded, which this command never does"
            )
        builder.download_and_prepare(
            download_dir=tmp / "downloads",
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(
                manual_dir=manual_dir, try_download_gcs=False
            ),
        )
    return Path(builder.data_dir)


def _write_amat(npz_dir: Path, out_dir: Path) -> Path:
    """Writes Larochelle's .amat files from npz_dir's binarized_mnist.npz into out_dir.

    Runs npz_dir's own write_amat.py, which checks each file's checksum.
    """
    script = npz_dir / _AMAT_SCRIPT
    if not script.is_file():
        raise MissingManualFilesError(
            f"manual_dir {str(npz_dir)!r} has {_AMAT_SOURCE} but no {_AMAT_SCRIPT} to "
            "write the .amat files from it"
        )
    subprocess.run(
        [sys.executable, os.fspath(script), os.fspath(out_dir)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """Command line entry point; see the module doc."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {data.PREPARE_MODULE}",
        description="Prepare a tfds data set offline from local files (never downloads).",
    )
    parser.add_argument("--dataset", required=True, choices=data.TFDS_NAMES)
    parser.add_argument(
        "--manual_dir", required=True, help="folder with the files tfds would download"
    )
    parser.add_argument(
        "--data_dir",
        default=None,
        help="tfds data folder (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)",
    )
    args = parser.parse_args(argv)
    path = prepare(args.dataset, manual_dir=args.manual_dir, data_dir=args.data_dir)
    print(f"{args.dataset} is prepared in {path}")


if __name__ == "__main__":
    main()
