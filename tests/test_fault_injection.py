"""Crashes at every filesystem change: a checkpoint save, an export and a teacher-cache build are interrupted at their
1st, 2nd, ... write, rename or removal in turn, as a killed process would be, until one runs to its end. After each
crash the disk must hold the newest complete checkpoint (or the previous export / cache), whole and readable, and
nothing earlier may be lost; then the interrupted operation, run again, must succeed. A hypothesis state machine
drives the checkpoints through saves, prunings, crashed saves and loads in any order.
"""

import builtins
import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from modeling_mcad.checkpointing import STATE_FILE, CheckpointManager
from modeling_mcad.utils import recover_directory

from .conftest import snapshot


class Crash(BaseException):
    """The process dies: not an `Exception`, so that no `except Exception` of the code under test handles it."""


# os.open flags and open() modes that create or change a file.
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_WRITE_MODES = set("wax+")


@contextlib.contextmanager
def crash_at(point: int | None):
    """
    Count the filesystem changes made inside the block — files opened for writing, folders made, renames, removals —
    and crash at the `point`-th (1-based): that change raises `Crash` instead of happening, and so does every later
    one, since a dead process changes nothing more. A call that would change nothing (making a folder that exists,
    removing a file that does not) is no crash point: a crash there is a crash before the next change. Writes made by
    compiled code on its own (safetensors, torch's zip writer) are not seen, but the renames that publish them are.
    Yields the list of changes, which keeps growing past the crash: its length reaching `point` means it crashed.
    """
    changes = []

    def guarded(name, function, is_change):
        def call(*args, **kwargs):
            if not is_change(*args, **kwargs):
                return function(*args, **kwargs)
            changes.append(f"{name}{tuple(map(str, args[:2]))}")
            if point is not None and len(changes) >= point:
                raise Crash(f"crash at change {len(changes)}: {changes[-1]}")
            return function(*args, **kwargs)

        return call

    def always(*args, **kwargs):
        return True

    def makes_a_folder(path, *args, dir_fd=None, **kwargs):
        return dir_fd is not None or not os.path.lexists(path)

    def removes_a_file(path, *args, dir_fd=None, **kwargs):
        return dir_fd is not None or os.path.lexists(path)

    def opens_for_writing(file, mode="r", *args, **kwargs):
        return not isinstance(file, int) and bool(_WRITE_MODES & set(mode))

    def os_open_writes(path, flags, *args, **kwargs):
        return bool(flags & _WRITE_FLAGS)

    checks = {"replace": always, "rename": always, "rmdir": always, "mkdir": makes_a_folder, "unlink": removes_a_file,
              "remove": removes_a_file, "open": os_open_writes}
    patches = [mock.patch.object(os, name, guarded(f"os.{name}", getattr(os, name), check))
               for name, check in checks.items()]
    patches += [mock.patch.object(module, "open", guarded("open", builtins.open, opens_for_writing))
                for module in (builtins, io)]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield changes


def interrupt_at_every_change(operation, check_after_crash, check_after_rerun, reset=None) -> int:
    """
    Run `operation()` crashing at its 1st filesystem change and check what the next process finds
    (`check_after_crash(1)`), run it again crashing at its 2nd change, and so on, until a run reaches its end: the rerun
    that succeeds (`check_after_rerun()`). Without `reset`, each run starts from what the last crash left, as a user
    rerunning the command after each crash would. With it, each run starts from the disk `reset()` makes and each
    crash is followed by a full rerun, checked too: every crash point of that one path. Returns the number of crashes.
    """
    point = 1
    while True:
        if reset is not None:
            reset()
        with crash_at(point) as changes:
            try:
                operation()
            except BaseException:  # the Crash, or what a library made of it
                if len(changes) < point:
                    raise  # a failure of its own, not the crash
        if len(changes) < point:  # it ran to its end
            check_after_rerun()
            return point - 1
        check_after_crash(point)
        if reset is not None:
            operation()
            check_after_rerun()
        point += 1


class FakeAccelerator:
    """What `CheckpointManager` uses of an `Accelerator`, for one process: its training state is `value`, in a file."""

    is_main_process = True

    def __init__(self, value=None):
        self.value = value

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        (Path(folder) / "model.json").write_text(json.dumps(self.value))

    def load_state(self, folder):
        self.value = json.loads((Path(folder) / "model.json").read_text())


def training_state(step: int, epoch: int = 0) -> dict:
    return {"global_step": step, "epoch": epoch, "step_in_epoch": step, "nonfinite_skipped": 0}


def save_checkpoint(folder: Path, step: int, value, keep: int = 2, epoch: int = 0) -> Path:
    """A checkpoint of `step` whose model is `value`."""
    return CheckpointManager(folder, FakeAccelerator(value), keep=keep).save(training_state(step, epoch))


def load_checkpoint(folder: Path, which: str = "latest"):
    """The model value and training state a new process restores from `which` (None and the fresh state: none)."""
    accelerator = FakeAccelerator()
    state = CheckpointManager(folder, accelerator).load(which)
    return accelerator.value, state


def checkpoint_values(folder: Path) -> dict[str, object]:
    """
    Every checkpoint under `folder` as a new process finds it (after what its first load puts back), each loaded on
    its own (so each must be whole), by name.
    """
    load_checkpoint(folder)
    return {path.name: load_checkpoint(folder, str(path))[0]
            for path in CheckpointManager(folder, FakeAccelerator()).checkpoints()}


def visible(folder: Path) -> list[str]:
    """The names in `folder` but the hidden staging folders a crashed `atomic_directory` leaves (never read)."""
    return sorted(path.name for path in folder.iterdir() if ".tmp-" not in path.name)


# --- (a) a checkpoint save ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("same_step", [False, True], ids=["new_step", "same_step_again"])
def test_a_checkpoint_save_crashed_anywhere_keeps_the_newest_complete_checkpoint(tmp_path, same_step):
    """
    Steps 1 and 2 are saved (keep 2); then step 3 (its save prunes step 1) or step 2 again with the next epoch's state
    (the end of an epoch that ended on a checkpoint), crashed at each change in turn.
    """
    template, folder = tmp_path / "template", tmp_path / "checkpoints"
    save_checkpoint(template, 1, "model 1")
    save_checkpoint(template, 2, "model 2")
    step, value = (2, "model 2, epoch 1") if same_step else (3, "model 3")

    def reset():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(template, folder)

    def operation():
        save_checkpoint(folder, step, value, epoch=int(same_step))

    def check_after_crash(point):
        latest, state = load_checkpoint(folder)
        assert latest in ("model 2", value), point
        values = checkpoint_values(folder)
        assert set(values.values()) <= {"model 1", "model 2", value}, (point, values)
        if same_step:  # the step's old checkpoint or its new one, and step 1 untouched
            assert values == {"step_1": "model 1", "step_2": latest}, (point, values)
            assert state["epoch"] == (1 if latest == value else 0)
        else:  # step 2 is never lost; step 1 goes only once step 3 is in place
            assert values["step_2"] == "model 2" and (latest == value) == ("step_3" in values), (point, values)
        assert not [path.name for path in folder.iterdir() if path.name.startswith("step_") and path.name not in values]

    def check_after_rerun():
        assert load_checkpoint(folder)[0] == value
        expected = {"step_1": "model 1", "step_2": value} if same_step else {"step_2": "model 2", "step_3": value}
        assert checkpoint_values(folder) == expected
        assert sorted(path.name for path in folder.iterdir()) == sorted(expected)  # nothing left behind

    crashes = interrupt_at_every_change(operation, check_after_crash, check_after_rerun, reset)
    assert crashes >= 8  # the temporary folder, the model file, the state file, the renames, the syncs, the pruning


# --- (b) an export --------------------------------------------------------------------------------------------------


def test_an_export_crashed_anywhere_leaves_the_previous_export(exported_student, retrieval_student, tmp_path,
                                                                monkeypatch):
    """
    The export replaces an earlier one. Its graphs (ONNX, and ExecuTorch where installed) are copied from the earlier
    export instead of exported again (seconds per call): the export's own writes, renames and checks all run.
    """
    from modeling_mcad import export

    template, report = exported_student
    student, split = retrieval_student[0], retrieval_student[1].select(range(8))
    for exporter, graphs in (("export_onnx", export.ONNX_DIR), ("export_executorch", export.EXECUTORCH_DIR)):
        monkeypatch.setattr(export, exporter, lambda model, processor, output_dir, graphs=graphs: shutil.copytree(
            template / graphs, output_dir))
    executorch = "executorch-xnnpack" in report["variants"]
    output = tmp_path / "export"
    shutil.copytree(template, output)

    def operation():
        export.export_variants(student, output, eval_split=split, max_r1_drop=report["max_r1_drop"],
                               executorch=executorch, latency_batch_sizes=())

    operation()  # the earlier export, as this test's export writes it
    before = snapshot(output)
    parity = json.loads((output / export.PARITY_FILE).read_text())

    def check_after_crash(point):
        recover_directory(output)  # what the next export does first
        after = snapshot(output)
        # The earlier export, or (a crash after the last rename) the new one: the same files, the same bytes.
        assert after == before, point
        assert visible(tmp_path) == ["export"], point

    def check_after_rerun():
        assert snapshot(output) == before
        assert json.loads((output / export.PARITY_FILE).read_text()) == parity
        assert visible(tmp_path) == ["export"]

    assert interrupt_at_every_change(operation, check_after_crash, check_after_rerun) >= 40


# --- (c) a teacher-cache build --------------------------------------------------------------------------------------


def test_a_teacher_cache_build_crashed_anywhere_leaves_the_previous_cache(tmp_path):
    """The cache stage with --overwrite_output_dir rebuilds an existing cache (shards, merge, record, rename)."""
    from modeling_mcad.shapes import make_shapes
    from modeling_mcad.teacher_cache import CACHE_COLUMNS, TeacherCache, build_teacher_cache
    from modeling_mcad.teachers import MCADTeacher

    from .test_teachers import tiny_blip, tiny_clip

    torch.manual_seed(0)
    (dual, dual_processor), (fusion, fusion_processor) = tiny_clip(), tiny_blip()
    teacher_dir = tmp_path / "teacher"
    MCADTeacher.from_teachers(dual, fusion, dual_processor=dual_processor,
                              fusion_processor=fusion_processor).save_pretrained(teacher_dir)
    teacher = MCADTeacher.from_pretrained(teacher_dir)
    split = make_shapes(seed=0, train=12, validation=0, test=0, image_size=32)["train"]
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0,
                                  wait_for_everyone=lambda: None)
    template, run = tmp_path / "template", tmp_path / "run"
    cache = build_teacher_cache(teacher, teacher_dir, split, template, accelerator, batch_size=8)
    reference = TeacherCache(cache)
    expected = reference.targets(torch.arange(len(reference.rows)))
    folder = run / cache.relative_to(template)
    shutil.copytree(template, run)

    def operation():
        build_teacher_cache(teacher, teacher_dir, split, run, accelerator, batch_size=8, overwrite=True)

    def check_readable():
        targets = TeacherCache.for_run(run, teacher_dir, split).targets(torch.arange(len(reference.rows)))
        for name in CACHE_COLUMNS:
            torch.testing.assert_close(targets[name], expected[name], rtol=0, atol=0, msg=name)

    def check_after_crash(point):
        recover_directory(folder)  # what the next cache stage does first (it then checks the record, as here)
        check_readable()

    def check_after_rerun():
        check_readable()
        assert visible(run / "cache") == [folder.name]  # no shards or halves left behind

    assert interrupt_at_every_change(operation, check_after_crash, check_after_rerun) >= 10


# --- the checkpoints under any sequence of saves, prunings, crashes and loads ---------------------------------------


class CheckpointsMachine(RuleBasedStateMachine):
    """
    The model: the checkpoints on disk in the order they were written, name -> value. "latest" must load the last one
    written completely; pruning keeps the `keep` last written; a crashed save leaves either the old checkpoints or the
    new one published (the older ones pruned or not), and no `step_` folder that does not load whole.
    """

    def __init__(self):
        super().__init__()
        self.root = tempfile.TemporaryDirectory()
        self.folder = Path(self.root.name) / "checkpoints"
        self.keep = 2
        self.written: dict[str, object] = {}  # name -> value, oldest first
        self.saves = 0
        self.crashes_since_pruning = 0  # each may leave one checkpoint more than `keep`

    def teardown(self):
        self.root.cleanup()

    def new_value(self, step: int) -> str:
        self.saves += 1
        return f"model of save {self.saves} (step {step})"

    def publish(self, name: str, value) -> None:
        self.written.pop(name, None)
        self.written[name] = value

    def prune_model(self) -> None:
        self.written = dict(list(self.written.items())[-self.keep:])
        self.crashes_since_pruning = 0

    @rule(step=st.integers(0, 5))  # steps repeat and go back, as after a resume from an older checkpoint
    def save(self, step):
        value = self.new_value(step)
        save_checkpoint(self.folder, step, value, keep=self.keep)
        self.publish(f"step_{step}", value)
        self.prune_model()

    @rule(step=st.integers(0, 5), point=st.integers(1, 16))
    def crashed_save(self, step, point):
        value = self.new_value(step)
        with crash_at(point) as changes, contextlib.suppress(Crash):
            save_checkpoint(self.folder, step, value, keep=self.keep)
        name = f"step_{step}"
        if len(changes) < point:  # it ran to its end
            self.publish(name, value)
            self.prune_model()
            return
        on_disk = checkpoint_values(self.folder)
        if on_disk.get(name) == value:  # crashed once the new checkpoint was in place
            self.publish(name, value)
        # The newest `keep` (counting the new one if in place) are all there; older ones may be pruned already.
        newest = dict(list(self.written.items())[-self.keep:])
        assert newest.items() <= on_disk.items() <= self.written.items(), (newest, on_disk, self.written)
        self.written = {key: value for key, value in self.written.items() if key in on_disk}
        self.crashes_since_pruning += 1

    @rule(keep=st.integers(1, 3))
    def prune(self, keep):
        self.keep = keep
        manager = CheckpointManager(self.folder, FakeAccelerator(), keep=keep)
        manager.prune()
        self.prune_model()

    @precondition(lambda self: self.written)
    @rule()
    def load_latest(self):
        value, state = load_checkpoint(self.folder)
        name, expected = list(self.written.items())[-1]
        assert (value, f"step_{state['global_step']}") == (expected, name)

    @invariant()
    def only_whole_checkpoints_in_write_order(self):
        manager = CheckpointManager(self.folder, FakeAccelerator())
        assert [path.name for path in manager.checkpoints()] == list(reversed(self.written))
        for path in manager.checkpoints():
            assert (path / STATE_FILE).is_file() and (path / "model.json").is_file(), path
        assert len(self.written) <= self.keep + self.crashes_since_pruning


TestCheckpointsMachine = CheckpointsMachine.TestCase
TestCheckpointsMachine.settings = settings(max_examples=30, stateful_step_count=12, deadline=None, database=None)
