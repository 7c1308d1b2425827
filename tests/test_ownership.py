"""What Strata may replace: a folder it wrote and marked, of the same kind; never a user's folder or file."""
from __future__ import annotations

import pytest

from activations.atomic import existing_dir, finish_replace, replace_dir
from activations.errors import StrataError
from activations.ownership import owner_kind


def bundle(tmp_path, name: str, text: str):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "index.html").write_text(text)
    return folder


def test_replacing_its_own_folder_works_and_a_users_folder_is_refused(tmp_path):
    final = tmp_path / "out"
    replace_dir(bundle(tmp_path, "a.partial", "first"), final, "share")
    replace_dir(bundle(tmp_path, "b.partial", "second"), final, "share")
    assert (final / "index.html").read_text() == "second" and owner_kind(final) == "share"
    assert not (tmp_path / "out.old").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(StrataError, match="did not write"):
        replace_dir(bundle(tmp_path, "c.partial", "x"), mine, "share")
    assert (mine / "notes.txt").read_text() == "keep" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    with pytest.raises(StrataError, match="existing file"):
        replace_dir(bundle(tmp_path, "d.partial", "x"), mine / "notes.txt", "share")
    with pytest.raises(StrataError, match="not a checkpoint folder"):  # another kind of Strata folder
        replace_dir(bundle(tmp_path, "e.partial", "x"), final, "checkpoint")


def test_a_kill_while_the_old_folder_is_removed_does_not_block_the_next_swap(tmp_path, monkeypatch):
    from pathlib import Path

    final = tmp_path / "out"
    replace_dir(bundle(tmp_path, "a.partial", "first"), final, "share")
    (final / "more.html").write_text("a second file")
    real_unlink, calls = Path.unlink, []

    def dies_after_one(self, *args, **kwargs):  # the process is killed after the first file of out.old is gone
        calls.append(self.name)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(bundle(tmp_path, "b.partial", "second"), final, "share")
    monkeypatch.undo()
    assert (tmp_path / "out.old").is_dir() and owner_kind(tmp_path / "out.old") == "share"
    replace_dir(bundle(tmp_path, "c.partial", "third"), final, "share")
    assert (final / "index.html").read_text() == "third" and not (tmp_path / "out.old").exists()


def test_finishing_an_interrupted_swap_removes_only_strata_s_old_folder(tmp_path):
    final, old = tmp_path / "out", tmp_path / "out.old"
    replace_dir(bundle(tmp_path, "a.partial", "first"), final, "share")
    replace_dir(bundle(tmp_path, "b.partial", "second"), old, "share")  # as a kill after the swap leaves it
    finish_replace(final, "share")
    assert not old.exists() and (final / "index.html").read_text() == "first"

    final.rename(old)  # killed between the two renames: out.old is the only complete folder, and stays
    finish_replace(final, "share")
    assert existing_dir(final) == old and (old / "index.html").read_text() == "first"

    mine = tmp_path / "mine"
    (tmp_path / "mine.old").mkdir()
    (tmp_path / "mine.old" / "notes.txt").write_text("keep")
    replace_dir(bundle(tmp_path, "c.partial", "x"), tmp_path / "elsewhere", "share")
    (tmp_path / "elsewhere").rename(mine)
    with pytest.raises(StrataError, match="did not write"):
        finish_replace(mine, "share")
    assert (tmp_path / "mine.old" / "notes.txt").read_text() == "keep"


def test_folders_written_before_markers_are_recognised(tmp_path):
    legacy = tmp_path / "share"
    (legacy / "assets").mkdir(parents=True)
    (legacy / "index.html").write_text("v0.1")
    (legacy / "assets" / "plotly.min.js").write_text("//")
    assert owner_kind(legacy) == "share"
    replace_dir(bundle(tmp_path, "new.partial", "v0.2"), legacy, "share")
    assert (legacy / "index.html").read_text() == "v0.2"
