"""Training checkpoints that a crash cannot damage: Accelerate's `save_state`, written atomically, with fallback.

A checkpoint is `step_<N>/` holding what `Accelerator.save_state` writes (weights as safetensors, optimizer,
scheduler and RNG states, loaded back with `weights_only=True`) plus `training_state.json` (epoch, step, and the
checkpoint's place in the order of writing). It is written under a temporary name and renamed when complete (saving
a step again replaces the folder through `replace_directory`), and pruning renames a checkpoint away before deleting
it, so a folder named `step_<N>` is always whole. "latest" and the pruning follow the order of writing, not the step:
a run resumed from an older checkpoint writes lower steps than the ones it left behind, and its own are the newest.
A damaged newest checkpoint (a disk error, a hand edit) is detected at load and the previous one used, with a
warning.
"""

import json
import logging
import re
import shutil
import textwrap
from pathlib import Path

from .errors import UserError
from .utils import previous_path, recover_directory, remove_directory, replace_directory

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.json"
STATE_KEYS = ("global_step", "epoch", "step_in_epoch", "nonfinite_skipped")
WRITE_ORDER = "write_order"  # in the state file: 1 for the first checkpoint written in the folder, then 2, 3, ...
_STEP_FOLDER = re.compile(r"^step_(\d+)$")
_HIDDEN_STEP_FOLDER = re.compile(r"^\.(?:tmp-)?(step_\d+)")  # a checkpoint being written, replaced or removed


def fresh_state() -> dict:
    """The training state of a run that starts from the beginning."""
    return dict.fromkeys(STATE_KEYS, 0)


class CheckpointMismatchError(UserError):
    """A checkpoint holds the weights of another model (another student config or objective) than the run's."""


class CheckpointManager:
    """
    Saves and restores the full training state of an `Accelerator`.

    Args:
        folder (`Path`): where `step_<N>` checkpoints live.
        accelerator (`accelerate.Accelerator`): the prepared training objects are whatever it holds.
        keep (`int`): how many of the checkpoints written last to keep.
    """

    def __init__(self, folder: Path, accelerator, keep: int = 2):
        self.folder = Path(folder)
        self.accelerator = accelerator
        self.keep = max(1, keep)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, the last written first; one whose state file cannot be read counts as the oldest."""
        if not self.folder.is_dir():
            return []
        found = [(self._write_order(path), int(match.group(1)), path) for path in self.folder.iterdir()
                 if path.is_dir() and (match := _STEP_FOLDER.match(path.name))]
        return [path for *_, path in sorted(found, reverse=True)]

    def save(self, state: dict) -> Path:
        """Write a checkpoint of the current training state and prune the oldest; every process must call it."""
        accelerator = self.accelerator
        final = self.folder / f"step_{state['global_step']}"
        temporary = self.folder / f".tmp-{final.name}"  # one name all processes know: each writes its RNG state there
        if accelerator.is_main_process:
            self._recover()
            temporary.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            newest = self.checkpoints()[:1]  # in write order: the newest first
            order = 1 + max(self._write_order(newest[0]), 0) if newest else 1
            (temporary / STATE_FILE).write_text(json.dumps({**state, WRITE_ORDER: order}, indent=2))
            # The same step saved again (the end of an epoch that ended on a checkpoint) replaces the folder.
            replace_directory(temporary, final)
            self.prune()  # the checkpoint just written is the newest, so it is kept
            logger.info("checkpoint saved: %s", final)
        accelerator.wait_for_everyone()
        return final

    def prune(self) -> None:
        """Remove all but the `keep` checkpoints written last (main process only)."""
        for old in self.checkpoints()[self.keep:]:
            remove_directory(old)

    def load(self, which: str) -> dict:
        """
        Restore a checkpoint and return its training state; every process must call it.

        Args:
            which (`str`): a checkpoint folder, or "latest" for the last written one under `folder` that loads. With
                "latest" and no checkpoint at all, training starts from the beginning.

        Raises:
            `CheckpointMismatchError`: the checkpoint was written for another model (no older one is tried: it would
                be another model's too). `UserError`: no checkpoint at `which`, its state file is damaged, or none
                under `folder` loads.
        """
        if self.accelerator.is_main_process:
            self._recover()
        self.accelerator.wait_for_everyone()
        if which != "latest":
            path = Path(which)
            if not (path / STATE_FILE).is_file():
                raise UserError(
                    f"--resume_from_checkpoint {which}: no checkpoint there (no {STATE_FILE}). Pass a step_<N> "
                    f"folder under {self.folder}, or 'latest'."
                )
            return self._restore(path)
        candidates = self.checkpoints()
        if not candidates:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting from the beginning",
                           self.folder)
            return fresh_state()
        unreadable = [path.name for path in candidates if self._write_order(path) < 0]  # listed last
        if unreadable:
            logger.warning("checkpoint(s) %s in %s: %s is damaged; passed over", unreadable, self.folder, STATE_FILE)
        for path in candidates:
            try:
                return self._restore(path)
            except CheckpointMismatchError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure to read means a damaged checkpoint
                logger.warning("checkpoint %s is damaged (%s: %s); trying the previous one",
                               path, type(error).__name__, error)
        raise UserError(
            f"No loadable checkpoint in {self.folder} (tried {[p.name for p in candidates]}); remove the damaged "
            "ones or start without --resume_from_checkpoint."
        )

    def _recover(self) -> None:
        """Undo what a crash left: a replaced checkpoint put back, half-written or half-removed ones deleted."""
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            match = _HIDDEN_STEP_FOLDER.match(path.name)
            if match is None:
                continue
            final = self.folder / match.group(1)
            if path == previous_path(final):
                recover_directory(final)
            else:
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _write_order(path: Path) -> int:
        try:
            return int(json.loads((path / STATE_FILE).read_text(encoding="utf-8")).get(WRITE_ORDER, 0))
        except (OSError, ValueError, TypeError, AttributeError):  # a damaged state file: the oldest
            return -1

    def _state(self, path: Path) -> dict:
        """The training state saved in the checkpoint `path`, or a UserError naming its damaged state file."""
        file = path / STATE_FILE
        try:
            state = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:  # JSON and UTF-8 errors are ValueErrors
            problem = f"{type(error).__name__}: {error}"
        else:
            if isinstance(state, dict) and all(isinstance(state.get(key), int) for key in STATE_KEYS):
                return state
            problem = f"it does not hold the integers {', '.join(STATE_KEYS)}"
        others = [other.name for other in self.checkpoints() if other.resolve() != path.resolve()]
        raise UserError(
            f"{file} is damaged ({textwrap.shorten(problem, 200)}). Resume from another checkpoint of {self.folder} "
            f"({', '.join(others) or 'there is none'}) or from 'latest', which passes over damaged ones, or start "
            "without --resume_from_checkpoint."
        )

    def _restore(self, path: Path) -> dict:
        state = self._state(path)
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
        return {key: value for key, value in state.items() if key != WRITE_ORDER}
