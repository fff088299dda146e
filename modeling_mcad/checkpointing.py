"""Training checkpoints that a crash cannot damage: Accelerate's `save_state`, written atomically, with fallback.

A checkpoint is `step_<N>/` holding what `Accelerator.save_state` writes (weights as safetensors, optimizer,
scheduler and RNG states, loaded back with `weights_only=True`) plus `training_state.json` (epoch, step). It is
written under a temporary name and renamed when complete, so a folder named `step_<N>` is always whole; a
damaged newest checkpoint (a disk error, a hand edit) is detected at load and the previous one used, with a
warning.
"""

import json
import logging
import os
import re
import shutil
import textwrap
from pathlib import Path

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.json"
_STEP_FOLDER = re.compile(r"^step_(\d+)$")


class CheckpointMismatchError(ValueError):
    """A checkpoint holds the weights of another model (another student config or objective) than the run's."""


class CheckpointManager:
    """
    Saves and restores the full training state of an `Accelerator`.

    Args:
        folder (`Path`): where `step_<N>` checkpoints live.
        accelerator (`accelerate.Accelerator`): the prepared training objects are whatever it holds.
        keep (`int`): how many of the newest checkpoints to keep.
    """

    def __init__(self, folder: Path, accelerator, keep: int = 2):
        self.folder = Path(folder)
        self.accelerator = accelerator
        self.keep = max(1, keep)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), path) for path in self.folder.iterdir()
                 if path.is_dir() and (m := _STEP_FOLDER.match(path.name))]
        return [path for _, path in sorted(found, reverse=True)]

    def save(self, state: dict) -> Path:
        """Write a checkpoint of the current training state; every process must call it."""
        accelerator = self.accelerator
        final = self.folder / f"step_{state['global_step']}"
        temporary = self.folder / f".tmp-step_{state['global_step']}"
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (temporary / STATE_FILE).write_text(json.dumps(state, indent=2))
            if final.exists():  # the same step saved again (the end of an epoch that ended on a checkpoint)
                shutil.rmtree(final)
            os.replace(temporary, final)
            for old in self.checkpoints()[self.keep:]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("checkpoint saved: %s", final)
        accelerator.wait_for_everyone()
        return final

    def load(self, which: str) -> dict:
        """
        Restore a checkpoint and return its training state.

        Args:
            which (`str`): a checkpoint folder, or "latest" for the newest loadable one under `folder`. With
                "latest" and no checkpoint at all, training starts from the beginning.

        Raises:
            `CheckpointMismatchError`: the checkpoint was written for another model (no older one is tried: it would
                be another model's too). `ValueError`: no checkpoint at `which`, or none under `folder` loads.
        """
        fresh = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "nonfinite_skipped": 0}
        if which != "latest":
            path = Path(which)
            if not (path / STATE_FILE).is_file():
                raise ValueError(
                    f"--resume_from_checkpoint {which}: no checkpoint there (no {STATE_FILE}). Pass a step_<N> "
                    f"folder under {self.folder}, or 'latest'."
                )
            return self._restore(path)
        candidates = self.checkpoints()
        if not candidates:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting from the beginning",
                           self.folder)
            return fresh
        for path in candidates:
            try:
                return self._restore(path)
            except CheckpointMismatchError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure to read means a damaged checkpoint
                logger.warning("checkpoint %s is damaged (%s: %s); trying the previous one",
                               path, type(error).__name__, error)
        raise ValueError(
            f"No loadable checkpoint in {self.folder} (tried {[p.name for p in candidates]}); remove the damaged "
            "ones or start without --resume_from_checkpoint."
        )

    def _restore(self, path: Path) -> dict:
        state = json.loads((path / STATE_FILE).read_text())
        try:
            self.accelerator.load_state(str(path))
        except RuntimeError as error:
            if "Error(s) in loading state_dict" not in str(error):  # torch's (and safetensors') wording for a misfit
                raise
            differences = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error)]
            raise CheckpointMismatchError(
                f"Checkpoint {path} was written for another model: its weights do not fit this run's "
                f"({len(differences)} difference(s), the first: {textwrap.shorten(differences[0], 200)}). Resume "
                "with the student_preset / student_config and objective it was trained with, or start without "
                "--resume_from_checkpoint (in another --output_dir to keep these checkpoints)."
            ) from None
        logger.info("resumed from %s (epoch %d, step %d)", path, state["epoch"], state["global_step"])
        return state
