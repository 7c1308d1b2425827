"""scripts/sweep.py as a researcher uses it: write a small YAML grid over k and lr on a harvested run, run it,
read the table / summary.json / frontier.html, rerun it (finished members are skipped, unfinished ones resume),
and see a broken member reported while the others finish. Members are real `strata train` processes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from activations import layout

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sweep.py"
BASE = "base: {arch: topk, layers: '2', batch_size: 256, max_tokens: 1024, expansion: 4, device: cpu}\n"


def sweep(*args) -> int:
    spec = importlib.util.spec_from_file_location("sweep_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def read(path) -> dict:
    return json.loads(Path(path).read_text())


def test_grid_sweep_trains_every_member_writes_frontier_and_resumes(run, tmp_path, capsys):
    # 1e-3 unquoted is a *string* to YAML 1.1: the sweep must still read it as a float
    config = write(tmp_path, f"run: {run}\nname: k-lr\nparallel: 2\n{BASE}grid:\n  k: [4, 8]\n  lr: [1e-3, 4.0e-3]\n")
    assert sweep(config) == 0
    out = capsys.readouterr().out
    names = [f"k-lr-{i}" for i in range(4)]

    status = read(layout.sweep_dir(run, "k-lr") / "sweep.json")
    assert [m["name"] for m in status["members"]] == names
    assert [m["params"] for m in status["members"]] == [{"k": 4, "lr": 0.001}, {"k": 4, "lr": 0.004},
                                                        {"k": 8, "lr": 0.001}, {"k": 8, "lr": 0.004}]
    assert {m["status"] for m in status["members"]} == {"finished"}
    for name in names:  # each member trained into its own train dir with its own metrics log
        assert layout.metrics_path(run, name).is_file()
        assert read(layout.checkpoint_dir(run, name) / "state.json")["done"] is True
        assert read(layout.train_dir(run, name) / "config.json")["identity"]["layers"] == "2"

    summary = read(layout.sweep_dir(run, "k-lr") / "summary.json")
    rows = {r["name"]: r for r in summary["members"]}
    assert summary["sweep"] == "k-lr" and list(rows) == names
    for r in rows.values():
        assert r["status"] == "finished" and r["source"] == "train" and r["loss_recovered"] is None
        assert r["l0"] == pytest.approx(r["params"]["k"])   # TopK: exactly k active latents per token
        assert 0 < r["fvu"] < 1 and 0 <= r["dead_fraction"] <= 1
        assert r["config"]["k"] == r["params"]["k"] and r["config"]["max_tokens"] == 1024
    # more active latents reconstruct better; nothing on the frontier is beaten on both axes
    assert min(r["fvu"] for r in rows.values() if r["l0"] == 8) < min(r["fvu"] for r in rows.values() if r["l0"] == 4)
    front = [r for r in rows.values() if r["frontier"]]
    assert front and not any(o["l0"] <= f["l0"] and o["fvu"] < f["fvu"] for f in front for o in rows.values())

    page = (layout.sweep_dir(run, "k-lr") / "frontier.html").read_text()
    assert "Pareto frontier" in page and all(n in page for n in names)
    assert len(page) > 1_000_000 and '<script src="http' not in page  # plotly.js inline: opens offline
    table = out[out.index("member  status"):]
    assert all(n in table for n in names) and "FVU" in table

    # rerun: finished members are skipped (not retrained), an unfinished one resumes
    states = {n: layout.checkpoint_dir(run, n) / "state.json" for n in names}
    state0 = read(states["k-lr-0"])
    states["k-lr-0"].write_text(json.dumps(dict(state0, done=False)))  # as if killed before its last checkpoint
    mtimes = {n: p.stat().st_mtime_ns for n, p in states.items()}
    assert sweep(config) == 0
    out = capsys.readouterr().out
    for n in names[1:]:
        assert f"[{n}] finished earlier; skipped" in out
        assert states[n].stat().st_mtime_ns == mtimes[n]
    assert "[k-lr-0] resuming" in out and read(states["k-lr-0"])["done"] is True
    assert "--resume" in read(layout.sweep_dir(run, "k-lr") / "sweep.json")["members"][0]["command"]


def test_failed_member_is_reported_while_the_others_finish_and_are_evaluated(run, tmp_path, capsys):
    config = write(tmp_path, f"run: {run}\nname: bad-k\nparallel: 2\neval: {{ce_contexts: 2}}\n{BASE}"
                             f"grid: {{k: [4, 999]}}\n")  # 999 > 128 latents: that member's `strata train` fails
    assert sweep(config) == 1
    out = capsys.readouterr().out
    status = {m["name"]: m for m in read(layout.sweep_dir(run, "bad-k") / "sweep.json")["members"]}
    assert status["bad-k-0"]["status"] == "finished" and status["bad-k-0"]["error"] == ""
    assert status["bad-k-1"]["status"] == "failed"
    assert status["bad-k-1"]["error"].startswith("train: k=999") and "\n" not in status["bad-k-1"]["error"]
    assert "[bad-k-1] failed" in out

    rows = {r["name"]: r for r in read(layout.sweep_dir(run, "bad-k") / "summary.json")["members"]}
    good = rows["bad-k-0"]
    assert (layout.train_dir(run, "bad-k-0") / "eval.json").is_file()
    assert good["source"] == "eval" and isinstance(good["loss_recovered"], float) and good["frontier"]
    assert good["l0"] == pytest.approx(4) and 0 < good["fvu"] < 1
    assert rows["bad-k-1"]["l0"] is None and rows["bad-k-1"]["status"] == "failed"
    assert "CE loss recovered vs L0" in (layout.sweep_dir(run, "bad-k") / "frontier.html").read_text()


@pytest.mark.parametrize("body,message", [
    ("{BASE}grid: {{kk: [1, 2]}}\n", "unknown TrainConfig field 'kk'"),
    ("{BASE}grid: {{k: []}}\n", "grid: k has no values"),
    ("{BASE}grid: {{}}\n", "grid: must map"),
    ("{BASE}grid: {{k: [4, many]}}\n", "k='many' is not a valid int"),
    ("{BASE}grid: {{k: [4]}}\nrandom: {{n: 2, space: {{k: [4]}}}}\n", "exactly one of"),
    ("base: {{name: x}}\ngrid: {{k: [4]}}\n", "name is set by the sweep"),
    ("{BASE}grid: {{k: [4]}}\nparalel: 2\n", "unknown sweep key(s) paralel"),
])
def test_bad_config_is_one_line_error_and_nothing_is_written(run, tmp_path, capsys, body, message):
    config = write(tmp_path, f"run: {run}\n" + body.format(BASE=BASE))
    assert sweep(config) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (run / "sweeps").exists() and not layout.train_root(run).exists()


def test_missing_run_is_an_error(tmp_path, capsys):
    assert sweep(write(tmp_path, f"{BASE}grid: {{k: [4]}}\n")) == 2
    assert "missing `run:`" in capsys.readouterr().err
    assert sweep(write(tmp_path, f"run: {tmp_path / 'nope'}\n{BASE}grid: {{k: [4]}}\n")) == 2
    assert "harvest it first" in capsys.readouterr().err


def test_random_search_is_seeded_and_stays_in_its_ranges(run, tmp_path, capsys):
    from strata.sweep import Runner, load_sweep

    config = write(tmp_path, f"run: {run}\n{BASE}random:\n  n: 6\n  seed: 3\n  space:\n"
                             "    k: [4, 8]\n    lr: {log_uniform: [1e-4, 1e-2]}\n    expansion: {uniform: [2, 6]}\n")
    first, again = load_sweep(config), load_sweep(config)
    params = [m.params for m in first.members]
    assert params == [m.params for m in again.members] and len(params) == 6
    assert all(p["k"] in (4, 8) and 1e-4 <= p["lr"] <= 1e-2 and p["expansion"] in range(2, 7) for p in params)
    assert len({p["lr"] for p in params}) == 6
    assert [m.name for m in first.members] == [f"sweep-{i}" for i in range(6)]  # named after the file
    assert "WANDB_RUN_GROUP" not in Runner(first).env(first.members[0].config)
    first.members[0].config.wandb_project = "my-sweeps"  # with wandb on, every member logs under the sweep's group
    assert Runner(first).env(first.members[0].config)["WANDB_RUN_GROUP"] == "sweep"
    assert sweep(config, "--dry-run") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all("new  strata train" in ln and "--lr" in ln for ln in lines)
    assert not (run / "sweeps").exists()
