"""Orbax checkpoints of a train state, with a fallback past corrupt ones.

Saves are synchronous and atomic (orbax writes a temporary directory and
renames it when complete), so a killed process leaves either the whole
checkpoint or none. A checkpoint that is present but unreadable (truncated or
corrupted files), or whose arrays no longer match the SHA-256 saved with them
(a flipped bit in the data), is skipped with a warning and the one before it
restored; the only good checkpoint is never deleted, since orbax deletes old
checkpoints only after a newer save has completed. An unreadable checkpoint is
moved aside (to `corrupt_checkpoint_<step>` beside the directory), not deleted.

A state that has gained fields since its checkpoint was written (a NamedTuple, fields
only ever appended: `vaekl.steps.TrainState`'s `baseline` came on 2026-12-07) is not
corrupt: the fields the checkpoint has are restored and the new ones keep the template's
initial values, with a warning, so a run from an older vaekl resumes where it stopped.

Under `jax.distributed` every process calls `save` and `restore_latest`: orbax
writes each array once (the processes that hold copies share the writing) and
restores it onto every device of the template's sharding. The directory must be
one that every process sees; process 0 alone moves an unreadable checkpoint aside.
"""

import hashlib
import shutil
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

_CHECKSUM = "vaekl_sha256"


def checksum(state: Any) -> str:
    """A digest of the arrays of `state`, independent of its container types and order."""
    digests = []
    for leaf in jax.tree.leaves(state):
        a = np.ascontiguousarray(np.asarray(leaf))
        digests.append(hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).digest())
    return hashlib.sha256(b"".join(sorted(digests))).hexdigest()


class Checkpointer:
    """Saves and restores one pytree by step under `directory`."""

    def __init__(self, directory: Path, *, max_to_keep: int = 2):
        self._directory, self._max_to_keep = Path(directory).absolute(), max_to_keep
        self._manager = self._new_manager()

    def _new_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self._directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self._max_to_keep, create=True, enable_async_checkpointing=False,
                cleanup_tmp_directories=True))

    def steps(self) -> list[int]:
        """Steps of the checkpoints on disk, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Writes `state` as the checkpoint of `step` (blocking until complete)."""
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True,
                           custom_metadata={_CHECKSUM: checksum(state)})
        self._manager.wait_until_finished()

    def restore_latest(self, template: Any) -> tuple[Optional[int], Any]:
        """Restores the newest readable checkpoint shaped (and sharded) like `template`.

        With `template=None` the arrays are restored as saved (same device
        topology only) and an unreadable checkpoint raises instead of falling back.

        Returns:
          (step, state), or (None, template) when there is no readable checkpoint.
        """
        for step in reversed(self.steps()):
            try:
                state, added = self._restore(step, template)
                saved = (self._manager.metadata(step).custom_metadata or {}).get(_CHECKSUM)
                restored = [getattr(state, f) for f in state._fields if f not in added] \
                    if added else state  # The checksum covers what was saved.
                if saved is not None and saved != checksum(restored):
                    raise ValueError("its arrays do not match the checksum saved with them")
            except Exception as e:  # orbax raises many types for damaged files.
                if template is None:
                    raise  # Without a template a topology mismatch looks the same: no fallback.
                logging.warning("Checkpoint at step %d in %s is unreadable (%s: %s); trying"
                                " the one before.", step, self._manager.directory,
                                type(e).__name__, str(e).splitlines()[0][:200])
                self._quarantine(step)
                continue
            return step, state
        return None, template

    def _restore(self, step: int, template: Any) -> tuple[Any, list[str]]:
        """(`step` restored shaped like `template`, the template's fields it lacked).

        Only a NamedTuple template whose checkpoint holds a strict subset of its fields
        (read from the checkpoint's tree metadata) lacks any; those keep the template's.
        """
        fields = getattr(type(template), "_fields", ())
        saved = set(fields)
        if fields:
            try:  # The checkpoint's top-level keys, without reading its arrays.
                saved = set(ocp.StandardCheckpointHandler().metadata(
                    self._directory / str(step) / "default"))
            except Exception:  # Unreadable metadata: the plain restore below says why.
                pass
        added = [f for f in fields if f not in saved]
        if not added or not saved or not saved <= set(fields):
            return self._manager.restore(step, args=ocp.args.StandardRestore(template)), []
        part = {f: getattr(template, f) for f in fields if f in saved}
        state = template._replace(
            **self._manager.restore(step, args=ocp.args.StandardRestore(part)))
        logging.warning("The checkpoint at step %d in %s was written before the train state had"
                        " %s; resuming with their initial values.", step, self._directory,
                        ", ".join(added))
        return state, added

    def _quarantine(self, step: int) -> None:
        src = Path(self._manager.directory) / str(step)
        dst = src.parent.parent / f"corrupt_checkpoint_{step}"
        if jax.process_index() == 0:
            shutil.rmtree(dst, ignore_errors=True)
            shutil.move(src, dst)
            logging.warning("Moved the unreadable checkpoint to %s.", dst)
        # A fresh manager: a failed restore can leave orbax's item layout guessed wrong
        # (a step dir without its item), which would fail every older checkpoint too.
        self._manager.close()
        self._manager = self._new_manager()

    def close(self) -> None:
        self._manager.close()
