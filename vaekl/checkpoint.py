"""Orbax checkpoints of a train state, with a fallback past corrupt ones.

Saves are synchronous and atomic (orbax writes a temporary directory and
renames it when complete), so a killed process leaves either the whole
checkpoint or none. A checkpoint that is present but unreadable (truncated or
corrupted files) is skipped with a warning and the one before it restored; the
only good checkpoint is never deleted, since orbax deletes old checkpoints only
after a newer save has completed. An unreadable checkpoint is moved aside (to
`corrupt_checkpoint_<step>` beside the directory), not deleted.
"""

from pathlib import Path
from typing import Any, Optional

import shutil

import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
    """Saves and restores one pytree by step under `directory`."""

    def __init__(self, directory: Path, *, max_to_keep: int = 2):
        self._manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False,
                cleanup_tmp_directories=True))

    def steps(self) -> list[int]:
        """Steps of the checkpoints on disk, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Writes `state` as the checkpoint of `step` (blocking until complete)."""
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
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
                state = self._manager.restore(step, args=ocp.args.StandardRestore(template))
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

    def _quarantine(self, step: int) -> None:
        src = Path(self._manager.directory) / str(step)
        dst = src.parent.parent / f"corrupt_checkpoint_{step}"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.move(src, dst)
        logging.warning("Moved the unreadable checkpoint to %s.", dst)
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()
