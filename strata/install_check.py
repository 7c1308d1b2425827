"""Is `import sae` Strata's `sae`? A check run before anything imports Strata's generic top-level packages.

Strata ships the import names `activations`, `sae` and `dashboard`, and other distributions use the same names
(EleutherAI's sparsify was published as `sae`; PyPI has packages called `dashboard` and `activations`). Installed
in the same environment, such a distribution either comes first on sys.path or overwrites Strata's files in
site-packages, and Strata would then fail much later with an ImportError that points nowhere near the cause.

`find_clash()` returns one line naming the module, where it was found and the fix (None when all three are
Strata's own); `exit_if_clash()` prints it as `strata: error: ...` and exits with status 2. Strata's own copies
lie beside the `strata` package (site-packages for an installed wheel, the checkout for an editable install or
PYTHONPATH), and in a wheel install each file must still match the hash saestrata's RECORD lists for it.

Standard library only: this module must work when those packages are someone else's.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

DISTRIBUTION = "saestrata"
PACKAGES = ("activations", "sae", "dashboard")
SEPARATE_VENV = "or install Strata in a separate virtual environment"


def strata_root() -> Path:
    """The folder that holds Strata's packages: site-packages for an installed wheel, else the checkout."""
    return Path(__file__).resolve().parents[1]


def find_clash() -> str | None:
    """One line naming the first of PACKAGES that is not Strata's own, where it was found and the fix."""
    root = strata_root()
    for name in PACKAGES:
        problem = _check_package(name, root)
        if problem:
            return problem
    return None


def exit_if_clash() -> None:
    """Stop the `strata` command with one line (exit status 2) when a package name belongs to someone else."""
    problem = find_clash()
    if problem:
        print(f"strata: error: {problem}", file=sys.stderr)
        raise SystemExit(2)


def _check_package(name: str, root: Path) -> str | None:
    own = root / name
    reinstall = "reinstall Strata (pip install --force-reinstall saestrata)"
    found = _resolved_location(name)
    if found is None:
        return f"the module '{name}' cannot be found (Strata's copy belongs in {own}): {reinstall}"
    if found != own:
        owner = _owner(found.parent, f"{name}/__init__.py" if found.is_dir() else found.name)
        if owner:
            fix = f"uninstall it (pip uninstall {owner}) {SEPARATE_VENV}"
        else:
            fix = f"take {found.parent} off PYTHONPATH or run from another folder, {SEPARATE_VENV}"
        where = f"{found} (distribution {owner})" if owner else str(found)
        return f"the module '{name}' comes from {where}, not from Strata ({own}): {fix}"
    if not (own / "__init__.py").is_file():
        return f"Strata's package '{name}' in {own} has no __init__.py (damaged install): {reinstall}"
    changed = _changed_files(name, root)
    if changed:
        culprit = _owner(root, changed)
        if culprit:
            return (f"Strata's module '{name}' in {own} was overwritten by the distribution {culprit}, which uses the "
                    f"same import name: pip uninstall {culprit}, then pip install --force-reinstall saestrata, "
                    f"{SEPARATE_VENV}")
        return f"{root / changed} is not the file saestrata installed (changed or missing): {reinstall}"
    return None


def _resolved_location(name: str) -> Path | None:
    """The package folder (or module file) that `import name` uses, found without importing it."""
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None) if module is not None else None
    if spec is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
    if spec is None:
        return None
    if spec.has_location and spec.origin:
        origin = Path(spec.origin).resolve()
        return origin.parent if origin.stem == "__init__" else origin
    locations = list(spec.submodule_search_locations or [])  # a namespace package: no __init__.py anywhere
    return Path(locations[0]).resolve() if locations else None


def _normalized(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def _changed_files(name: str, root: Path) -> str | None:
    """The first file of package `name` whose content differs from the hash in saestrata's RECORD (wheel installs;
    an editable install or a checkout records no hashes), as a path relative to `root`."""
    for dist in importlib.metadata.distributions(name=DISTRIBUTION, path=[str(root)]):
        for record in dist.files or []:
            if record.parts[0] != name or record.hash is None or record.hash.mode != "sha256":
                continue
            path = root / record
            digest = hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b""
            if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != record.hash.value:
                return str(record)
    return None


def _owner(site: Path, relative: str, skip: str = DISTRIBUTION) -> str | None:
    """The name of the distribution installed in folder `site` (other than `skip`) whose RECORD lists the file
    `relative` (a path under `site`, with forward slashes)."""
    for dist in importlib.metadata.distributions(path=[str(site)]):
        dist_name = dist.name or ""
        if _normalized(dist_name) != skip and any(str(f) == relative for f in dist.files or []):
            return dist_name
    return None
