"""Small shared helpers: atomic and durable writes of files and folders, progress bars."""

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def _fsync_directory(path: str | os.PathLike) -> None:
    """Make the entries of the folder `path` (files created, renamed or removed in it) durable."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; NTFS journals its renames itself
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    """Make every file under `folder` and every folder's entries durable, before the tree is renamed into place."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        _fsync_directory(root)


def previous_path(path: str | os.PathLike) -> Path:
    """Where `replace_directory` keeps the folder it replaces while the new one is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.previous")


def recover_directory(path: str | os.PathLike) -> None:
    """
    Finish a `replace_directory(..., path)` that a crash cut short: when it stopped between its two renames, `path`
    is missing and the old folder is put back from `previous_path(path)`; when it stopped after them, the old folder
    left beside the new one is removed. Call it from one process only.
    """
    path = Path(path)
    previous = previous_path(path)
    if not previous.exists():
        return
    if path.exists():
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(previous, path)
        _fsync_directory(path.parent)


def replace_directory(temporary: str | os.PathLike, path: str | os.PathLike) -> None:
    """
    Put the complete folder `temporary` in the place of `path` (which need not exist), durably: every file is synced
    first, and the parent folder after the renames.

    A folder cannot replace another in one rename (POSIX renames a folder only over an empty one), so the old folder is
    renamed to `previous_path(path)` first and removed once the new one is in place. A crash between the two renames
    leaves `path` missing and the old folder, whole, beside it: the next `replace_directory` or `atomic_directory` of
    `path` (or `recover_directory(path)`) puts it back first. An error there puts it back at once.
    """
    temporary, path = Path(temporary), Path(path)
    recover_directory(path)
    _fsync_tree(temporary)
    previous = previous_path(path)
    if path.exists():
        os.replace(path, previous)
        try:
            os.replace(temporary, path)
        except BaseException:
            os.replace(previous, path)
            raise
    else:
        os.replace(temporary, path)
    _fsync_directory(path.parent)
    shutil.rmtree(previous, ignore_errors=True)


def remove_directory(path: str | os.PathLike) -> None:
    """Remove the folder `path` as a whole: renamed to a hidden name first, so that a crash leaves no part of it."""
    path = Path(path)
    doomed = Path(tempfile.mkdtemp(prefix=f".{path.name}.removing-", dir=path.parent))
    os.replace(path, doomed / path.name)
    _fsync_directory(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """
    Yield a temporary folder beside `path`; when the block ends without error it replaces `path`
    (`replace_directory`), so a reader sees the old folder or the new one, never a half-written one. On error the
    temporary folder is removed and `path` is left as it was. An earlier replacement of `path` that a crash cut short
    is finished first, so the block sees the old folder, and the half-written or half-removed folders such crashes
    leave beside it (`.NAME.tmp-*`, `.NAME.removing-*`) are removed. Call it from one process only.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    for leftover in (*path.parent.glob(f".{glob.escape(path.name)}.tmp-*"),
                     *path.parent.glob(f".{glob.escape(path.name)}.removing-*")):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield temporary
        replace_directory(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """
    Yield a binary file opened beside `path`; when the block ends without error the file is synced and renamed
    over `path`, and the rename synced. On error it is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.tmp-", delete=False)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file through `atomic_file`."""
    with atomic_file(path) as handle:
        handle.write(text.encode("utf-8"))


def progress(iterable=None, total: int | None = None, desc: str | None = None, **kwargs):
    """
    A progress bar with an ETA over `iterable` (or updated by hand up to `total`): transformers' tqdm, so that
    `transformers.utils.logging.disable_progress_bar()` silences every bar of the package (the training script does
    so on all but the main process).
    """
    from transformers.utils import logging

    return logging.tqdm(iterable, total=total, desc=desc, **kwargs)
