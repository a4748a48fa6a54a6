"""The files of a run's workdir: config.json, metrics.jsonl, results.json, progress.

Every write is atomic (a temporary file renamed over the target), so a killed
process never leaves a half-written JSON file, and nothing already written is
lost when a run is resumed or rejected.
"""

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

# Fields that may differ when a run is resumed: they do not change what is trained.
RESUMABLE_CHANGES = ("num_epochs", "eval_importance_samples", "eval_every_epochs",
                     "eval_importance_samples_during", "eval_elbo_samples", "eval_batch_size",
                     "eval_chunk_size", "log_every_steps", "data_dir",
                     "data_path")
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
    """Writes `obj` as JSON atomically (a temp file renamed over `path`)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")
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
    new = json.loads(config.to_json_best_effort())
    config_path = path / "config.json"
    if config_path.exists():
        old = json.loads(config_path.read_text())
        resumable = set(RESUMABLE_CHANGES)
        if new.get("schedule") in EPOCH_DEPENDENT_SCHEDULES:
            resumable.discard("num_epochs")
        changed = sorted(k for k in set(old) | set(new)
                         if old.get(k) != new.get(k) and k not in resumable)
        if changed:
            diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
            raise ValueError(
                f"--workdir: {workdir!r} holds a run with a different config ({diffs}); resume"
                " it with the same config or choose a new --workdir.")
    if write:
        write_json(config_path, new)
    return path


def read_train_wall(path: Path) -> float:
    """Training seconds spent by earlier (interrupted) processes of this run."""
    progress = path / "progress.json"
    return json.loads(progress.read_text())["train_wall_s"] if progress.exists() else 0.0


def write_train_wall(path: Path, seconds: float) -> None:
    write_json(path / "progress.json", {"train_wall_s": seconds})


def write_results(path: Path, results: dict) -> None:
    write_json(path / "results.json", results)


class MetricsLog:
    """Appends JSON lines {"step", "split", "time" (Unix seconds), scalars...} to metrics.jsonl.

    On resume from a checkpoint at step S, lines after S (written by the
    interrupted process after its last checkpoint) are dropped first, so the
    replayed steps are neither duplicated nor missing. With `redo_eval` the eval
    line at S goes too: the final evaluation, written after the last checkpoint
    by a process killed before it finished, which the resumed one does again.
    With `enabled=False` (every process of a run but process 0) it reads and writes nothing.
    """

    def __init__(self, path: Path, *, truncate_after: int, redo_eval: bool = False,
                 enabled: bool = True):
        self._path, self._enabled = path, enabled
        if enabled and path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = []
            for ln in lines:
                try:
                    row = json.loads(ln)
                    if row["step"] < truncate_after or row["step"] == truncate_after and not (
                            redo_eval and row["split"] == "eval"):
                        kept.append(ln)
                except (json.JSONDecodeError, KeyError):
                    break  # A line cut short by a kill: drop it and what follows.
            tmp = Path(f"{path}.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, path)

    def write(self, step: int, split: str, scalars: dict) -> None:
        if not self._enabled:
            return
        line = json.dumps({"step": int(step), "split": split, "time": time.time(), **scalars},
                          default=_jsonable)
        with open(self._path, "a") as f:
            f.write(line + "\n")

    def write_train(self, metrics: dict, *, first_step: int, every: int,
                    at_step: tuple = ()) -> None:
        """Logs at each step divisible by `every` the mean over the steps since the last log.

        Args:
          metrics: name -> [steps] (or [seeds, steps]) values of consecutive steps.
          first_step: the step number of the first value (steps count from 1).
          every: the logging period in steps.
          at_step: names logged as their value at the logged step, not the window
            mean (metrics computed only at those steps).
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
            self.write(end, "train", row)


class Progress:
    """A log line per call with steps/s and the estimated time left."""

    def __init__(self, total_steps: int, *, first_step: int):
        self._total, self._first, self._start = total_steps, first_step, time.time()

    def report(self, step: int, metrics: dict) -> None:
        elapsed = time.time() - self._start
        rate = (step - self._first) / max(elapsed, 1e-9)
        eta = (self._total - step) / max(rate, 1e-9)
        loss = float(np.mean(metrics["loss"]))
        logging.info("step %d/%d  loss %.3f  %.0f steps/s  ETA %.0f s", step, self._total, loss,
                     rate, eta)
