"""RUN/train/<name>/: the folder one training run (or one `strata import`) owns.

Strata creates it together with its ownership marker (activations/ownership.py, kind "train") and its
config.json, so a later `--overwrite` can tell it from anything else: it deletes train/<name> only when the
folder carries that marker or is a Strata 0.1 training folder (a config.json holding the run's "identity"),
and refuses a user's folder or file before changing a byte. A run that fails before its first checkpoint
removes exactly the folders it created, so nothing empty is left behind and a plain rerun works.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from activations import layout
from activations.atomic import atomic_write_json
from activations.errors import StrataError
from activations.ownership import mark, owner_kind

KIND = "train"
CONFIG = "config.json"


def read_config(tdir) -> dict | None:
    """The folder's config.json ({"identity": {...}, "config": {...}}), or None when it has none."""
    path = Path(tdir) / CONFIG
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("identity"), dict):
        raise StrataError(f"{path} is unreadable (not the JSON object Strata writes): restore it, or retrain "
                          f"with --overwrite")
    return data


def is_training_folder(tdir) -> bool:
    """A folder Strata wrote as train/<name>: marked so, or (Strata 0.1, before markers) with a config.json
    that holds a training identity."""
    tdir = Path(tdir)
    if owner_kind(tdir) == KIND:
        return True
    if owner_kind(tdir) is not None or tdir.is_symlink() or not tdir.is_dir():
        return False
    try:
        return read_config(tdir) is not None
    except StrataError:
        return False


def check_replaceable(tdir) -> None:
    """Refuse (StrataError) unless train/<name> is missing, an empty folder, or Strata's training folder."""
    tdir = Path(tdir)
    hint = "choose another --name, or move it away yourself"
    if tdir.is_symlink():
        raise StrataError(f"{tdir} is a symbolic link; Strata will not replace it: {hint}")
    if not tdir.exists():
        return
    if not tdir.is_dir():
        raise StrataError(f"{tdir} is an existing file, not a Strata training folder; nothing was changed: {hint}")
    if is_training_folder(tdir) or not any(tdir.iterdir()):
        return
    kind = owner_kind(tdir)
    if kind is not None:
        raise StrataError(f"{tdir} is a Strata {kind} folder, not a training run; nothing was changed: {hint}")
    raise StrataError(f"{tdir} holds files Strata did not write (no training marker {layout.OWNER_MARKER} and no "
                      f"training config.json); nothing was changed: {hint}")


def remove(tdir) -> None:
    """Delete a training folder that check_replaceable accepted."""
    check_replaceable(tdir)
    if Path(tdir).exists():
        shutil.rmtree(tdir)


def create(tdir, record: dict) -> list[Path]:
    """Make train/<name> (and train/ when missing), mark it as Strata's and write its config.json `record`.
    Returns the folders it made, deepest first, for `remove_created`. A place that cannot be written is a
    StrataError naming it, with nothing left behind."""
    tdir = Path(tdir)
    made = [p for p in (tdir, tdir.parent) if not p.exists()]
    try:
        tdir.mkdir(parents=True, exist_ok=True)
        mark(tdir, KIND)
        atomic_write_json(tdir / CONFIG, record)
    except OSError as e:
        remove_created(made)
        raise StrataError(f"cannot write {tdir} ({e.strerror or e}); make {tdir.parent} writable, or train in a "
                          f"run directory you can write to") from None
    return made


def remove_created(made: list[Path]) -> None:
    """Undo `create` after a failure before the first checkpoint: the training folder it made (made[0]) goes,
    and so does train/ when create made that too and nothing else is in it."""
    if made:
        shutil.rmtree(made[0], ignore_errors=True)
    for folder in made[1:]:
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass
