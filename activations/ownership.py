"""What Strata may delete: only folders it wrote and recognises as its own, and only the one a command replaces.

Every folder Strata writes as one unit (a training run, a share bundle, an exported SAE, a sweep) carries a
marker file naming its kind; a harvest run is recognised by its manifest.json. `check_replaceable` is asked
before anything is replaced: a user's own folder or file, or a Strata folder of another kind, is refused.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from activations import layout
from activations.errors import StrataError


def mark(folder, kind: str) -> None:
    """Write the marker that makes `folder` recognisable as Strata's `kind` output (before it is swapped in)."""
    (Path(folder) / layout.OWNER_MARKER).write_text(json.dumps({"written_by": "strata", "kind": kind}) + "\n")


def owner_kind(folder) -> str | None:
    """The kind of Strata output `folder` is, or None when it is not one Strata can recognise as its own."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return None
    marker = folder / layout.OWNER_MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text())
        except (OSError, ValueError):
            return None
        return data.get("kind") if isinstance(data, dict) and data.get("written_by") == "strata" else None
    if layout.manifest_path(folder).is_file():
        return "run"
    if (folder / "state.json").is_file() and (folder / "saes").is_dir():
        return "checkpoint"  # written before markers existed (Strata 0.1)
    if (folder / "index.html").is_file() and (folder / "assets" / "plotly.min.js").is_file():
        return "share"  # a bundle written before markers existed (Strata 0.1)
    if _legacy_training(folder):
        return "train"
    return None


def _legacy_training(folder: Path) -> bool:
    """train/<name> written before markers existed (Strata 0.1): its config.json holds the run's "identity"."""
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("identity"), dict)


def check_replaceable(path, kind: str, hint: str = "choose another output path") -> None:
    """Refuse (StrataError) unless `path` is missing, an empty folder, or a folder of Strata's `kind`."""
    path = Path(path)
    if path.is_symlink():
        raise StrataError(f"{path} is a symbolic link; Strata will not replace it: {hint}")
    if not path.exists():
        return
    if not path.is_dir():
        raise StrataError(f"{path} is an existing file, not a Strata {kind} folder; Strata will not replace it: {hint}")
    found = owner_kind(path)
    if found == kind or not any(path.iterdir()):
        return
    if found is not None:
        raise StrataError(f"{path} is a Strata {found} folder, not a {kind} folder; nothing was changed: {hint}")
    raise StrataError(f"{path} holds files Strata did not write (no {kind} marker {layout.OWNER_MARKER}); "
                      f"nothing was changed: {hint}, or remove that folder yourself")


def check_swap_target(final, kind: str, hint: str) -> None:
    """Refuse (StrataError) unless `final` and the `.partial` / `.old` folders a swap uses beside it
    (activations/atomic.py) may all be replaced by Strata's `kind` output."""
    final = Path(final)
    for path in (final, final.with_name(final.name + ".partial"), final.with_name(final.name + ".old")):
        check_replaceable(path, kind, hint)


def remove_owned(folder) -> None:
    """Delete a folder Strata recognised as its own, its marker last: a kill half-way leaves a folder that is
    still recognisably Strata's (and is removed next time), never an unmarked one that would block a rerun."""
    folder = Path(folder)
    marker = folder / layout.OWNER_MARKER
    for child in folder.iterdir():
        if child != marker:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    marker.unlink(missing_ok=True)
    folder.rmdir()
