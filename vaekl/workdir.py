"""The files of a run's workdir: config.json, metrics and images, results.json, progress.

Every write is atomic (a temporary file renamed over the target), so a killed
process never leaves a half-written JSON file, and nothing already written is
lost when a run is resumed or rejected.
"""

import io
import itertools
import json
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vaekl import config as config_lib

# Fields that may differ when a run is resumed, besides every field of the groups of
# `config_lib.RESUMABLE_GROUPS` (evaluation): they do not change what is trained. (Where the
# data are read from; how often metrics are logged; num_epochs, which resumes to more epochs.)
RESUMABLE_FIELDS = ("num_epochs", "log_every_steps", "data_dir", "data_path")
# Schedules whose learning rate at every step depends on num_epochs (through the total
# number of steps): for them a resume with another num_epochs would train something else.
EPOCH_DEPENDENT_SCHEDULES = ("cosine", "warmup_cosine")


def prepare_workdir(workdir: str) -> Path:
    """Creates `workdir` (and parents) and checks that it is writable.

    Raises:
      ValueError: naming `workdir` when it is empty, a file, or not writable.
    """
    if not workdir:
        raise ValueError("--workdir: expected a directory path, got an empty string.")
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--workdir: {workdir!r} exists and is not a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--workdir: cannot create {workdir!r}: {e.strerror}.") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"--workdir: {workdir!r} is not writable.")
    return path


def write_json(path: Path, obj: Any) -> None:
    """Writes `obj` as JSON atomically; NumPy and JAX arrays become lists.

    The one JSON writer: training and the experiments write their results with it,
    and launch/runs.py its run records (launch.json), which the launcher and the
    run may write at the same time, hence a temporary file per process.
    """
    _write_atomic(Path(path), json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    """Writes `text` to a temporary file of this process, then renames it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "to_dict"):
        return x.to_dict()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def prepare(workdir: str, config, *, write: bool = True) -> Path:
    """Creates the workdir and writes config.json, or checks it against a previous run's.

    `write=False` only checks (the processes of a multi-process run other than process 0).

    Raises:
      ValueError: when the workdir holds a run whose config differs in a field
        that changes what is trained (the old run's files stay untouched).
    """
    path = prepare_workdir(workdir)
    config_path = path / "config.json"
    if config_path.exists():
        # Compared leaf by leaf (leaf names are unique), so a config.json of the flat layout
        # (written before the config was nested) resumes like a nested one. A field that
        # vaekl gained after that run began reads there as its default, which keeps the
        # behaviour from before the field (a new field's default must).
        try:
            saved = config_lib.leaves(json.loads(config_path.read_text()))
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"--workdir: {workdir!r} holds a config.json that is not a config"
                             " (neither nested nor the flat layout of vaekl.config's table);"
                             " choose a new --workdir.") from None
        defaults = config_lib.leaves(json.loads(config_lib.get_config().to_json_best_effort()))
        old = {**defaults, **saved}
        full = {**defaults, **config_lib.leaves(json.loads(config.to_json_best_effort()))}
        groups = config_lib.groups()
        resumable = {k for k, g in groups.items() if g in config_lib.RESUMABLE_GROUPS}
        resumable |= set(RESUMABLE_FIELDS)
        if full.get("schedule") in EPOCH_DEPENDENT_SCHEDULES:
            resumable.discard("num_epochs")
        changed = sorted(k for k in set(old) | set(full)
                         if old.get(k) != full.get(k) and k not in resumable)
        if changed:
            diffs = ", ".join(f"{_path(k, groups)}: {old.get(k)!r} -> {full.get(k)!r}"
                              for k in changed)
            raise ValueError(
                f"--workdir: {workdir!r} holds a run with a different config ({diffs}); resume"
                " it with the same config or choose a new --workdir.")
    if write:
        write_config(path, config)
    return path


def _path(leaf: str, groups: dict) -> str:
    """`group.leaf`, the name of a leaf in the nested config (the leaf itself if unknown)."""
    return f"{groups[leaf]}.{leaf}" if groups.get(leaf) else leaf


def write_config(path: Path, config) -> None:
    """config.json: the config that the run's results (to come) are of."""
    write_json(path / "config.json", json.loads(config.to_json_best_effort()))


def read_train_wall(path: Path) -> float:
    """Training seconds spent by earlier (interrupted) processes of this run."""
    progress = path / "progress.json"
    return json.loads(progress.read_text())["train_wall_s"] if progress.exists() else 0.0


def write_train_wall(path: Path, seconds: float) -> None:
    write_json(path / "progress.json", {"train_wall_s": seconds})


def write_results(path: Path, results: dict) -> None:
    write_json(path / "results.json", results)


PER_EXAMPLE = ("elbo", "log_likelihood")  # The per-example figures kept (float32).


def write_per_example(path: Path, per_example: dict) -> None:
    """per_example.npz: the final test ELBO and IWAE log-likelihood of each test example
    ([N], or [seeds, N]), so that two runs can be compared image by image (a paired
    standard error). Written before results.json, which marks the run done."""
    arrays = {k: np.asarray(per_example[k], np.float32) for k in PER_EXAMPLE if k in per_example}
    tmp = path / "per_example.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path / "per_example.npz")


class MetricWriter:
    """The one writer of a run's metrics: metrics.jsonl and TensorBoard event files.

    `write_scalars` appends a JSON line {"step", "split", "time" (Unix seconds),
    scalars...} to metrics.jsonl and writes each scalar to TensorBoard as `split/name`
    (a vector-valued figure, such as per_dim_kl, as `split_name/i`). `write_images` writes
    images to TensorBoard (the labelled PNGs are `vaekl.evaluate`'s). The event files
    are in `tensorboard/` (with `seeds`, one folder `tensorboard/seed_N/` per seed, each
    value's leading axis being the seeds), so `tensorboard --logdir=WORKDIR` shows them.

    On resume from a checkpoint at step S, metrics.jsonl lines after S (written by the
    interrupted process after its last checkpoint) are dropped first, so the replayed
    steps are neither duplicated nor missing. With `redo_eval` the eval line at S goes
    too: the final evaluation, written after the last checkpoint by a process killed
    before it finished, which the resumed one does again. The earlier processes' event
    files stay; each new one starts with TensorBoard's restart marker at step S + 1, on
    which TensorBoard drops their events from that step on.

    With `enabled=False` (every process of a multi-process run but process 0) it
    touches no file: no truncation, no event file, every write a no-op.
    """

    def __init__(self, workdir: Path, *, resume_step: int, redo_eval: bool = False,
                 seeds: Sequence[int] | None = None, enabled: bool = True):
        self._workdir, self._path = workdir, workdir / "metrics.jsonl"
        self._stacked, self._enabled = seeds is not None, enabled
        self._events = []
        if not enabled:
            return
        _truncate_metrics(self._path, resume_step, redo_eval)
        folders = ([workdir / "tensorboard" / f"seed_{s}" for s in seeds] if self._stacked
                   else [workdir / "tensorboard"])
        self._events = [_EventFile(folder, resume_step) for folder in folders]

    def write_scalars(self, step: int, scalars: dict, *, split: str,
                      wall_time: float | None = None) -> None:
        """Writes `scalars` (name -> number or list) of `step`, stamped `wall_time` (now)."""
        if not self._enabled:
            return
        wall_time = time.time() if wall_time is None else wall_time
        line = json.dumps({"step": int(step), "split": split, "time": wall_time, **scalars},
                          default=_jsonable)
        with open(self._path, "a") as f:
            f.write(line + "\n")
        for i, events in enumerate(self._events):
            values = {}
            for name, value in scalars.items():
                value = np.asarray(value, np.float64)
                value = value[i] if self._stacked else value
                if value.ndim == 0:
                    values[f"{split}/{name}"] = float(value)
                else:
                    width = len(str(value.size - 1))
                    values.update({f"{split}_{name}/{j:0{width}d}": float(v)
                                   for j, v in enumerate(value.ravel())})
            events.scalars(step, values, wall_time)

    def write_train(self, metrics: dict, *, first_step: int, every: int, at_step: tuple = (),
                    start_time: float, end_time: float) -> None:
        """Writes at each step divisible by `every` the mean over the steps since the last.

        The steps ran inside one device call, from `start_time` to `end_time` (Unix
        seconds), which gives the host no time of their own: step k of the n in `metrics`
        is stamped start_time + (end_time - start_time) k / n.

        Args:
          metrics: name -> [steps] (or [seeds, steps]) values of consecutive steps.
          first_step: the step number of the first value (steps count from 1).
          every: the logging period in steps.
          at_step: names written as their value at the logged step, not the window
            mean (metrics computed only at those steps).
          start_time: when the call that ran the steps started.
          end_time: when its results were on the host.
        """
        num = next(iter(metrics.values())).shape[-1]
        for end in range(first_step, first_step + num):
            if end % every:
                continue
            lo = max(end - every + 1, first_step) - first_step
            hi = end - first_step + 1
            row = {}
            for name, values in metrics.items():
                window = (values[..., hi - 1] if name in at_step
                          else np.mean(values[..., lo:hi], axis=-1))
                row[name] = window.tolist() if window.ndim else float(window)
            self.write_scalars(end, row, split="train",
                               wall_time=start_time + (end_time - start_time) * hi / num)

    def write_images(self, step: int, images: dict) -> None:
        """Writes `images` (name -> [H, W] grey values in [0, 1]) to TensorBoard as `images/NAME`.

        (The workdir's labelled PNGs of them are `vaekl.evaluate`'s.)
        """
        if not self._enabled:
            return
        from PIL import Image

        wall_time = time.time()
        for name, image in images.items():
            picture = Image.fromarray((255 * np.clip(image, 0, 1)).astype(np.uint8))
            encoded = io.BytesIO()
            picture.save(encoded, format="PNG")
            self._events[0].image(step, f"images/{name}", encoded.getvalue(), image.shape,
                                  wall_time)

    def flush(self) -> None:
        """Makes what was written so far durable in the event files (metrics.jsonl always is)."""
        for events in self._events:
            events.flush()

    def close(self) -> None:
        for events in self._events:
            events.close()


def _truncate_metrics(path: Path, resume_step: int, redo_eval: bool) -> None:
    """Drops metrics.jsonl lines after `resume_step` (and with `redo_eval` its eval line)."""
    if not path.exists():
        return
    kept = []
    for ln in (ln for ln in path.read_text().splitlines() if ln.strip()):
        try:
            row = json.loads(ln)
            if row["step"] < resume_step or row["step"] == resume_step and not (
                    redo_eval and row["split"] == "eval"):
                kept.append(ln)
        except (json.JSONDecodeError, KeyError):
            break  # A line cut short by a kill: drop it and what follows.
    _write_atomic(path, "".join(ln + "\n" for ln in kept))


_EVENT_FILE_COUNT = itertools.count()  # Tells apart the event files one process opens.


class _EventFile:
    """One TensorBoard event file: records of `Event` protos, as TensorBoard reads them.

    It uses tensorboard's record writer and protos on a plain file: tensorboard's
    `EventFileWriter` (and tensorboardX) would import TensorFlow (PyTorch) when installed.
    """

    def __init__(self, folder: Path, resume_step: int):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        folder.mkdir(parents=True, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
                f".{os.getpid()}.{next(_EVENT_FILE_COUNT)}")
        self._records = RecordWriter(open(folder / name, "wb"))
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        if resume_step:
            self._write(event_pb2.Event(
                wall_time=time.time(), step=resume_step + 1,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        self.flush()

    def _write(self, event) -> None:
        self._records.write(event.SerializeToString())

    def scalars(self, step: int, values: dict, wall_time: float) -> None:
        summary = self._summary_pb2.Summary(value=[
            self._summary_pb2.Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
        self._write(self._event_pb2.Event(wall_time=wall_time, step=int(step), summary=summary))

    def image(self, step: int, tag: str, png: bytes, shape: tuple, wall_time: float) -> None:
        image = self._summary_pb2.Summary.Image(height=shape[0], width=shape[1], colorspace=1,
                                                encoded_image_string=png)
        summary = self._summary_pb2.Summary(value=[self._summary_pb2.Summary.Value(
            tag=tag, image=image)])
        self._write(self._event_pb2.Event(wall_time=wall_time, step=int(step), summary=summary))

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        if not self._records.closed:
            self._records.close()


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, in order."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
