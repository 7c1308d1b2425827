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

from activations import ownership
from activations.atomic import atomic_write_json
from activations.errors import StrataError

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


def check_replaceable(tdir) -> None:
    """Refuse (StrataError) unless train/<name> is missing, an empty folder, or Strata's training folder."""
    ownership.check_replaceable(tdir, KIND, "choose another --name, or move it away yourself")


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
        ownership.mark(tdir, KIND)
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
