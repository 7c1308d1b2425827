"""The folder `strata harvest` is given: what it holds, whether a harvest may write there, and what it may delete.

A harvest run is recognised by its manifest (manifest.json, or parts/rank-*.json while a `torchrun` harvest is in
progress); the manifest is written before the first shard file, so shard files never exist without one. Strata
writes only into a missing or empty folder, one that holds nothing but its own leftovers (lock files, partial
files of a harvest killed before its first manifest), or a recognised run. It deletes only what a harvest wrote:
the manifest, parts/, shard files and partial files; never trainings, indexes, share bundles or sweeps made
from the run, and never anything in a folder it does not recognise.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from activations import layout
from activations.atomic import TMP_SUFFIX
from activations.config import HarvestConfig, identity_differences
from activations.errors import StrataError

# Outputs of later stages stored inside a run: made from its activations, never deleted by a harvest.
_DERIVED = {"train": layout.train_root, "index": layout.index_root, "share": layout.share_dir, "sweeps": layout.sweeps_root}
_LOCKS = {layout.LOCK, ".locks"}


def part_manifests(run) -> list[Path]:
    folder = layout.parts_dir(run)
    return sorted(folder.glob("rank-*.json")) if folder.is_dir() else []


def has_manifest(run) -> bool:
    return layout.manifest_path(run).is_file() or bool(part_manifests(run))


def _nonempty(p: Path) -> bool:
    return p.is_file() or p.is_dir() and any(p.iterdir())


def derived_outputs(run) -> list[str]:
    """Trainings, indexes, share bundles and sweeps inside the run, as 'train/x' names."""
    found = []
    for name, root in _DERIVED.items():
        folder = root(run)
        if folder.is_dir():
            found += [f"{name}/{p.name}" for p in sorted(folder.iterdir()) if p.name not in _LOCKS]
        elif folder.exists():
            found.append(name)
    return found


def harvest_files(run) -> list[Path]:
    """Every file a harvest writes: the manifest, per-process manifests, shard files, and their partial files."""
    run = Path(run)
    files = [run / layout.MANIFEST, run / (layout.MANIFEST + TMP_SUFFIX)]
    if layout.parts_dir(run).is_dir():
        files += [p for p in layout.parts_dir(run).iterdir() if p.name.startswith("rank-")]
    folders = [layout.tokens_dir(run)]
    if layout.acts_root(run).is_dir():
        folders += [p for p in layout.acts_root(run).iterdir() if p.is_dir()]
    for folder in folders:
        if folder.is_dir():
            files += [p for p in folder.iterdir() if layout.shard_index(p) is not None]
    return [p for p in files if p.is_file() or p.is_dir()]


def clear_harvest(run) -> None:
    """Delete what a harvest wrote (see `harvest_files`), then the folders that became empty; nothing else."""
    import shutil

    run = Path(run)
    for p in harvest_files(run):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    acts = layout.acts_root(run)
    for folder in ([p for p in acts.iterdir() if p.is_dir()] if acts.is_dir() else []) + [acts, layout.tokens_dir(run),
                                                                                          layout.parts_dir(run)]:
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()


def _leftover_only(run: Path) -> bool:
    """Nothing in `run` but Strata lock files and what a harvest killed before its first manifest leaves behind."""
    for p in run.iterdir():
        if p.name in _LOCKS or p.name == layout.MANIFEST + TMP_SUFFIX:
            continue
        if p.name in ("parts", "acts", "tokens") and p.is_dir() and not p.is_symlink() \
                and all(q.name.endswith(TMP_SUFFIX) or q.is_dir() and not any(q.iterdir()) for q in p.iterdir()):
            continue
        return False
    return True


def check_target(cfg: HarvestConfig) -> bool:
    """Refuse (StrataError) a folder a harvest may not write into; changes nothing. True when it holds a run."""
    run = Path(cfg.run_dir)
    if run.exists() and not run.is_dir():
        raise StrataError(f"{run} is a file, not a directory; choose another run directory")
    if not run.exists():
        return False
    if has_manifest(run):
        derived = derived_outputs(run)
        if cfg.overwrite and derived:
            shown = ", ".join(derived[:4]) + (f" and {len(derived) - 4} more" if len(derived) > 4 else "")
            raise StrataError(f"--overwrite would replace the activations that {shown} in {run} were made from; "
                              f"Strata deletes only what a harvest wrote: move or delete those yourself first, "
                              f"or harvest into a new folder")
        return True
    if _leftover_only(run):
        return False
    strata_data = [n for n in ("acts", "tokens", "parts", *_DERIVED) if _nonempty(run / n)]
    if strata_data:
        raise StrataError(f"{run} holds Strata data ({', '.join(n + '/' for n in strata_data)}) but no {layout.MANIFEST}, "
                          f"so Strata will neither resume nor clear it: if {layout.MANIFEST} was moved, put it back and "
                          f"rerun with --resume; otherwise harvest into a new folder, or move that folder away yourself")
    raise StrataError(f"{run} is not empty and holds no Strata run; Strata will not write into or clear a folder it did "
                      f"not create: choose a new or empty folder")


def clear_leftovers(run) -> None:
    """Remove the partial files of a harvest killed before its first manifest (a folder `check_target` passed)."""
    run = Path(run)
    if run.is_dir() and not has_manifest(run):
        clear_harvest(run)


def resume_command(run, config: dict) -> str:
    """The `strata harvest ... --resume` command line that continues or repairs `run` (its identity flags)."""
    if "synth" in config:  # a synthetic run is continued and repaired by `strata synth` (activations/synth.py)
        from activations.synth import resume_command as synth_resume

        return synth_resume(run, config)
    defaults = HarvestConfig().identity()
    flags = []
    for k, v in config.items():
        if k in defaults and v != defaults[k] and v is not None:
            flags += [f"--{k.replace('_', '-')}", str(v)]
    return shlex.join(["strata", "harvest", str(run), *flags, "--resume"])


def check_same_identity(run, old_config: dict, identity: dict) -> None:
    """A resume must ask for the run it continues: StrataError naming every field that differs, and the command
    that does continue it."""
    diffs = identity_differences(old_config, identity, HarvestConfig().identity())
    if diffs:
        raise StrataError(f"cannot resume {run} with a different config ({'; '.join(diffs)}); "
                          f"continue it with `{resume_command(run, old_config)}`, or pass --overwrite")
