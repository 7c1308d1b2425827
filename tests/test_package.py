"""Strata as `pip install saestrata` delivers it, and Strata next to other packages that use its import names.

The wheel is built (offline, with this environment's setuptools) from a clean copy of the sources and installed
non-editable into a fresh venv. The venv holds only the wheel; its dependencies (torch at the pin scripts/setup.sh
installs, and the rest of pyproject's list) are read from this environment's site-packages through a .pth file,
which adds their folder to sys.path without running the editable-install hook found there. Every command runs from
a folder outside the checkout with no PYTHONPATH, so only the installed copy of Strata can be imported.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("activations", "sae", "dashboard", "strata")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    return {**env, **extra}


def run(argv, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def source_files() -> list[str]:
    """Every file of the four packages in the checkout, as paths relative to the project root."""
    return sorted(str(f.relative_to(ROOT)) for pkg in PACKAGES for f in (ROOT / pkg).rglob("*")
                  if f.is_file() and "__pycache__" not in f.parts)


def source_modules() -> list[str]:
    """Dotted names of every importable module in the checkout (files in folders with an __init__.py)."""
    names = []
    for rel in source_files():
        path = Path(rel)
        if path.suffix == ".py" and (ROOT / path.parent / "__init__.py").is_file():
            parts = path.with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (a stale build/ folder in the checkout cannot leak into it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                 "-w", tmp / "dist", src], cwd=tmp)
    assert built.returncode == 0, built.stdout + built.stderr
    (whl,) = (tmp / "dist").glob("saestrata-*.whl")
    return whl


def fresh_venv(folder: Path, *wheels: Path) -> Path:
    """A new venv holding `wheels` (installed non-editable, no dependencies) that sees this environment's
    site-packages after its own. Returns its bin/ folder."""
    venv.EnvBuilder(with_pip=False).create(folder)
    bin_dir = folder / "bin"
    purelib = run([bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=folder)
    deps = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
    (Path(purelib.stdout.strip()) / "strata-test-dependencies.pth").write_text("\n".join(deps) + "\n")
    for whl in wheels:
        done = run([sys.executable, "-m", "pip", "--python", bin_dir / "python", "install", "--no-deps", "--no-index",
                    "-q", whl], cwd=folder)
        assert done.returncode == 0, done.stdout + done.stderr
    return bin_dir


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    return fresh_venv(tmp_path_factory.mktemp("venv") / "venv", wheel)


def test_wheel_holds_every_file_of_every_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in source_files() if f not in names]
    assert not missing, f"the wheel lacks {missing}"
    assert {"sae/analysis/analyze.py", "dashboard/views/features.py",
            "strata/dashboard_script/strata_dashboard.py"} <= names


def test_installed_wheel_imports_every_module_from_its_own_site_packages(installed, tmp_path):
    script = f"""
import importlib, json, sys, sysconfig
site = sysconfig.get_paths()["purelib"]
elsewhere = {{}}
for name in {source_modules()!r}:
    module = importlib.import_module(name)
    if not module.__file__.startswith(site):
        elsewhere[name] = module.__file__
from strata.install_check import find_clash
print(json.dumps({{"elsewhere": elsewhere, "clash": find_clash(), "site": site}}))
"""
    out = run([installed / "python", "-c", script], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["elsewhere"] == {}, "imported from outside the installed wheel"
    assert report["site"].startswith(str(installed.parent))
    assert report["clash"] is None


def test_strata_and_every_verb_help_run_from_the_installed_wheel(installed, tmp_path):
    top = run([installed / "strata", "--help"], cwd=tmp_path)
    assert top.returncode == 0, top.stderr[-3000:]
    listed = top.stdout.split("positional arguments:", 1)[1].split("options:", 1)[0]
    verbs = re.findall(r"^    ([a-z]+)\b", listed, flags=re.M)
    assert {"harvest", "train", "eval", "analyze", "dashboard", "share", "demo"} <= set(verbs)
    script = f"""
import contextlib, io
from strata.cli import main
for verb in {verbs!r}:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            main([verb, "--help"])
    except SystemExit as e:
        assert e.code == 0, (verb, e.code)
    assert out.getvalue().startswith(f"usage: strata {{verb}}"), out.getvalue()[:200]
    print("ok", verb)
"""
    each = run([installed / "python", "-c", script], cwd=tmp_path)
    assert each.returncode == 0, each.stderr[-3000:]
    assert each.stdout.split() == [w for v in verbs for w in ("ok", v)]


def test_every_third_party_import_is_a_declared_dependency(wheel):
    """Every top-level module the packages import (outside the standard library and Strata itself) comes from
    a distribution the wheel's metadata requires."""
    from importlib.metadata import packages_distributions

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    archive = zipfile.ZipFile(wheel)
    metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    required = {norm(re.match(r"[A-Za-z0-9._-]+", line[len("Requires-Dist: "):]).group(0))
                for line in metadata.splitlines() if line.startswith("Requires-Dist: ") and "extra ==" not in line}
    imported: dict[str, str] = {}
    for rel in source_files():
        if not rel.endswith(".py"):
            continue
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for top in {n.split(".")[0] for n in names} - set(PACKAGES) - set(sys.stdlib_module_names):
                imported.setdefault(top, rel)
    owners = packages_distributions()
    undeclared = {top: (rel, owners.get(top)) for top, rel in imported.items()
                  if not any(norm(d) in required for d in owners.get(top, []))}
    assert not undeclared, f"imported, not in pyproject's dependencies (module: (first file, dist)): {undeclared}"
    assert {"torch", "pandas", "pyarrow", "pyyaml"} <= required and "accelerate" not in required


# ---------------------------------------------------------------- another distribution's sae / dashboard


def test_strata_stops_when_another_distribution_overwrote_sae(wheel, tmp_path):
    """`pip install` of another project that ships a top-level `sae` (as sparsify once did) after Strata: the
    other project's files replace Strata's in site-packages."""
    other = tmp_path / "sparse_sae-1.0-py3-none-any.whl"
    info = "sparse_sae-1.0.dist-info"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("sae/__init__.py", '"""Another project\'s sparse autoencoders."""\n')
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: sparse-sae\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "".join(f"{p},,\n" for p in ("sae/__init__.py", f"{info}/METADATA",
                                                                     f"{info}/WHEEL", f"{info}/RECORD")))
    bin_dir = fresh_venv(tmp_path / "venv", wheel, other)
    out = run([bin_dir / "strata", "info", tmp_path], cwd=tmp_path)
    assert out.returncode == 2
    (line,) = out.stderr.splitlines()
    assert line.startswith("strata: error: Strata's module 'sae'")
    assert "overwritten by the distribution sparse-sae" in line
    assert "pip uninstall sparse-sae, then pip install --force-reinstall saestrata" in line


def fake_package(folder: Path, name: str) -> Path:
    (folder / name).mkdir(parents=True)
    (folder / name / "__init__.py").write_text(f'"""Somebody else\'s {name}."""\n')
    return folder / name


def test_strata_stops_when_a_foreign_sae_comes_first_on_pythonpath(tmp_path):
    fake = fake_package(tmp_path / "elsewhere", "sae")
    env = clean_env(PYTHONPATH=os.pathsep.join([str(fake.parent), str(ROOT)]))
    out = run([sys.executable, "-m", "strata.cli", "info", tmp_path], cwd=tmp_path, env=env)
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert line == (f"strata: error: the module 'sae' comes from {fake}, not from Strata ({ROOT / 'sae'}): take "
                    f"{fake.parent} off PYTHONPATH or run from another folder, or install Strata in a separate "
                    "virtual environment")


def test_dashboard_shows_the_clash_instead_of_failing_on_import(tmp_path):
    """PyPI's `dashboard` installed ahead of Strata: the page says which module, where, and what to do."""
    from dashboard.serve import APP

    fake = fake_package(tmp_path / "elsewhere", "dashboard")
    script = f"""
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({str(APP)!r}, default_timeout=60)
at.run()
assert not at.exception, [e.value for e in at.exception]
print(at.error[0].value)
"""
    env = clean_env(PYTHONPATH=os.pathsep.join([str(fake.parent), str(ROOT)]), STRATA_RUN=str(tmp_path))
    out = run([sys.executable, "-c", script], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith(f"Strata cannot start: the module 'dashboard' comes from {fake}")


# ---------------------------------------------------------------- the dashboard's sys.path


def test_dashboard_modules_cannot_shadow_top_level_modules_while_the_app_runs(tmp_path, monkeypatch):
    """Streamlit puts the folder of the script it runs first on sys.path. While the app renders, `import cache`
    or `import data` must not find dashboard/cache.py or dashboard/data.py."""
    from streamlit.testing.v1 import AppTest
    from test_dashboard_support import synthetic_run

    import dashboard.data
    from dashboard.serve import APP

    run_dir = synthetic_run(tmp_path / "run", [f"w{i}" for i in range(20)])
    own = sorted(p.stem for p in (ROOT / "dashboard").iterdir() if p.suffix == ".py" or (p / "__init__.py").exists())
    assert {"data", "cache", "charts", "render"} <= set(own)
    found = {}
    index_names = dashboard.data.index_names

    def index_names_and_look(run):  # called by the app on every run, while Streamlit's sys.path is in force
        from importlib.util import find_spec

        for name in own:
            spec = find_spec(name) if name != "__init__" else None
            found[name] = spec.origin if spec else None
        return index_names(run)

    monkeypatch.setattr(dashboard.data, "index_names", index_names_and_look)
    monkeypatch.setenv("STRATA_RUN", str(run_dir))
    monkeypatch.setenv("STRATA_READ_ONLY", "1")
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.header[0].value == "Overview"
    assert found, "the app did not run"
    shadowing = {name: origin for name, origin in found.items()
                 if origin and Path(origin).resolve().is_relative_to(ROOT / "dashboard")}
    assert shadowing == {}


def test_dashboard_server_ignores_a_dashboard_folder_in_the_current_folder(tmp_path):
    """`strata dashboard RUN` started from a folder that has its own dashboard/ (or sae/) still serves Strata's:
    the server's `python -m streamlit` must not put the current folder on sys.path."""
    from test_dashboard_support import synthetic_run

    from dashboard.serve import dashboard_env

    run_dir = synthetic_run(tmp_path / "run", [f"w{i}" for i in range(20)])
    fake_package(tmp_path / "project", "dashboard")
    env = dashboard_env(run_dir, read_only=True)
    # `-c` and `-m` put the current folder first on sys.path alike, unless PYTHONSAFEPATH is set.
    out = run([sys.executable, "-c", "import dashboard; print(dashboard.__file__)"], cwd=tmp_path / "project", env=env)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == ROOT / "dashboard" / "__init__.py"
