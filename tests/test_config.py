"""Flags, config files and sweeps as a researcher writes them: YAML that reads `1e-4` as a string, counts written
as "1024", one layer as `10`, lists for sites; a config saved by one command given back to `--resume`; every
verb's --help. Every source goes through one validation (strata/config.py); bad values are refused before work.
(The refusals typed on the command line are CONFIG_CASES in test_bad_input.py.)"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from activations import layout
from activations.manifest import load_manifest
from sae.train_config import TrainConfig
from strata.cli import build_parser, main
from strata.config import ConfigError, build_config, given_flags

FAST = ["--expansion", "4", "--progress", "false", "--device", "cpu", "--max-tokens", "1024"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_run) -> Path:
    dest = tmp_path_factory.mktemp("config") / "run"
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("train", "index", "share", "sweeps", ".locks"))
    return dest


def strata(*argv) -> int:
    return main([str(a) for a in argv])


def flags_to_config(*argv):
    """What `strata <verb> ...` would hand to its stage, without running it."""
    args = build_parser().parse_args([str(a) for a in argv])
    cls = {"train": TrainConfig}.get(argv[0]) or _config_class(argv[0])
    return build_config(cls, args.config, given_flags(cls, args), run_dir=args.run_dir)


def _config_class(verb: str):
    from sae.analysis.analyze import AnalyzeConfig
    from sae.evaluate import EvalConfig

    return {"eval": EvalConfig, "analyze": AnalyzeConfig}[verb]


def verbs() -> list[str]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


# ---------------------------------------------------------------- --help
def test_strata_help_lists_every_verb(capsys):
    assert strata("--help") == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: strata")
    assert set(verbs()) == {"demo", "harvest", "synth", "verify", "info", "analyze", "dashboard", "share", "train",
                            "eval", "export", "import", "graph", "intervene"}
    assert all(v in out for v in verbs())


@pytest.mark.parametrize("verb", ["demo", "harvest", "synth", "verify", "info", "analyze", "dashboard", "share",
                                  "train", "eval", "export", "import", "graph", "intervene"])
def test_every_verb_help_works(verb, capsys):
    assert strata(verb, "--help") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: strata {verb}")
    if verb in ("demo", "harvest", "train", "eval", "analyze", "graph", "intervene"):  # config verbs: every field documented
        assert "--config FILE" in out and "default:" in out
    if verb == "train":
        assert "5% of the steps" in out  # the literal % that crashed argparse's formatter
        assert "--arch {relu,topk,batchtopk,jumprelu,matryoshka}" in out and "int >= 0" in out


# ---------------------------------------------------------------- flags
def test_negative_numbers_are_values_in_any_notation():
    assert flags_to_config("train", "r", "--k-aux", "-1", "--lr", "2e-4").k_aux == -1
    assert flags_to_config("eval", "r", "--exclude-first", "-1").exclude_first == -1
    assert flags_to_config("analyze", "r", "--min-link", "-5e-1").min_link == -0.5
    assert flags_to_config("analyze", "r", "--min-link", "-.25").min_link == -0.25
    with pytest.raises(ConfigError, match=r"--lr: lr='-1E-3' is not a valid float > 0"):
        flags_to_config("train", "r", "--lr", "-1E-3")


def test_flags_win_over_the_file_and_bools_read_like_yaml(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("k: 16\nbf16: yes\nprogress: off\n")
    cfg = flags_to_config("train", "r", "--config", f, "--k", "8", "--skip")
    assert (cfg.k, cfg.bf16, cfg.progress, cfg.skip, cfg.run_dir) == (8, True, False, True, "r")


# ---------------------------------------------------------------- config files
def test_yaml_values_are_typed_and_a_run_trains_from_them(run, tmp_path):
    cfg_file = tmp_path / "train.yaml"
    # PyYAML reads 1e-4 as the *string* "1e-4"; counts quoted as strings; one layer as an int; sites as a list
    cfg_file.write_text('lr: 1e-4\nbatch_size: "256"\nlayers: 2\nsites: [resid]\nk: 8.0\nheldout_fraction: "0.2"\n')
    assert strata("train", run, "--config", cfg_file, "--name", "typed", *FAST) == 0
    saved = json.loads((layout.train_dir(run, "typed") / "config.json").read_text())["identity"]
    assert saved["lr"] == 1e-4 and isinstance(saved["lr"], float)
    assert saved["batch_size"] == 256 and saved["k"] == 8 and isinstance(saved["k"], int)
    assert saved["layers"] == "2" and saved["sites"] == "resid" and saved["heldout_fraction"] == 0.2
    assert (layout.checkpoint_dir(run, "typed") / "state.json").is_file()


def test_lists_become_the_comma_strings_every_stage_parses(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"layers": [0, 3, "5-7"], "sites": ["resid", "mlp_out"], "arch": "matryoshka",
                             "matryoshka_prefixes": [64, 256]}))
    cfg = build_config(TrainConfig, f)
    assert (cfg.layers, cfg.sites, cfg.matryoshka_prefixes) == ("0,3,5-7", "resid,mlp_out", "64,256")


@pytest.mark.parametrize("text,message", [
    ("k: 32.5\n", "config file {f}: k=32.5 is not a valid int > 0: input should be a valid integer, got a "
                  + "number with a fractional part"),
    ("layers: [0, 1.5]\n", "layers=[0, 1.5]: a list here must hold only ints or strings"),
    ("layers: 0-x\n", "bad layer spec '0-x'"),
    ("arch: topk\nlearning_rate: 1e-3\n", "unknown TrainConfig field(s) learning_rate; valid fields: adam_eps, arch"),
    ("- k: 8\n", "must hold a mapping of field: value, not a list"),
    ("k: [8\n", "is not valid YAML"),
])
def test_bad_files_name_the_file_the_field_and_the_value(tmp_path, text, message):
    f = tmp_path / "t.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        build_config(TrainConfig, f)
    assert message.format(f=f) in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- saved configs back into --resume
def test_train_config_json_is_accepted_back_by_resume(run, tmp_path, capsys):
    assert strata("train", run, "--name", "again", "--k", "8", "--lr", "1e-3", "--batch-size", "256",
                  "--layers", "1,2", *FAST) == 0
    saved = json.loads((layout.train_dir(run, "again") / "config.json").read_text())["config"]
    as_yaml, as_json = tmp_path / "saved.yaml", tmp_path / "saved.json"
    as_yaml.write_text(yaml.safe_dump(saved))
    as_json.write_text(json.dumps(saved))
    before = (layout.checkpoint_dir(run, "again") / "state.json").read_text()
    assert strata("train", run, "--config", as_yaml, "--resume") == 0
    assert strata("train", run, "--config", as_json, "--resume") == 0
    assert (layout.checkpoint_dir(run, "again") / "state.json").read_text() == before  # finished: nothing to add
    as_yaml.write_text(yaml.safe_dump({**saved, "k": 16}))  # the identity is really compared
    capsys.readouterr()
    assert strata("train", run, "--config", as_yaml, "--resume") == 2
    assert "the config differs from the run being resumed (k: 8 -> 16)" in capsys.readouterr().err


def test_a_run_started_by_an_older_strata_resumes_when_new_fields_keep_their_defaults(run, capsys):
    """A field added since the run started (say, the CLT's --sparsity) is absent from its saved identity: the run
    did what the default does, so resuming it with the default is the same run; asking for another value is not."""
    assert strata("train", run, "--name", "old", "--k", "8", "--batch-size", "256", "--layers", "1", *FAST) == 0
    cfg_file = layout.train_dir(run, "old") / "config.json"
    record = json.loads(cfg_file.read_text())
    for field in ("sparsity", "tanh_coef", "tanh_c"):
        del record["identity"][field]
    cfg_file.write_text(json.dumps(record))
    assert strata("train", run, "--name", "old", "--k", "8", "--batch-size", "256", "--layers", "1", *FAST,
                  "--resume") == 0
    capsys.readouterr()
    assert strata("train", run, "--name", "old", "--k", "8", "--batch-size", "256", "--layers", "1", *FAST,
                  "--resume", "--tanh-coef", "0.5") == 2
    assert "(tanh_coef: 0.001 -> 0.5)" in capsys.readouterr().err


def test_harvest_manifest_config_is_accepted_back_by_resume(tmp_path, tiny_llama, capsys):
    first = tmp_path / "h.yaml"
    first.write_text(f"model: {tiny_llama}\nsites: [resid, mlp_out]\nlayers: [1, 2]\ncontext: '32'\n"
                     f"batch_contexts: 2\nshard_tokens: 64\nmax_tokens: 512\nprogress: false\n")
    run = tmp_path / "h"
    assert strata("harvest", run, "--config", first) == 0
    manifest = load_manifest(run)
    assert sorted(manifest.keys) == ["mlp_out.1", "mlp_out.2", "resid.1", "resid.2"]
    assert manifest.config["layers"] == "1,2" and manifest.config["context"] == 32
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump({**manifest.config, "progress": False}))
    assert strata("harvest", run, "--config", saved, "--resume") == 0
    assert load_manifest(run).n_tokens == 512


def test_eval_takes_a_config_file_like_the_other_run_verbs(run, tmp_path):
    assert strata("train", run, "--name", "ev", "--k", "8", "--batch-size", "256", "--layers", "1", *FAST) == 0
    f = tmp_path / "e.yaml"
    f.write_text("name: ev\nce_contexts: '0'\nbatch_size: 256\ndevice: cpu\n")
    assert strata("eval", run, "--config", f) == 0
    result = json.loads((layout.train_dir(run, "ev") / "eval.json").read_text())
    assert result["name"] == "ev" and "ce_loss_recovered" not in result["saes"]["resid.1"]["overall"]


# ---------------------------------------------------------------- sweeps: the same validation per member
def test_sweep_members_are_validated_and_typed_like_flags(run, tmp_path):
    from strata.sweep import member_flags
    from strata.sweep_config import load_sweep

    f = tmp_path / "s.yaml"
    f.write_text(f"run: {run}\nname: typed\nbase: {{layers: 2, batch_size: '256', lr: 1e-4, exclude_first: 0}}\n"
                 "grid: {k: ['4', 8.0], sites: [[resid], resid]}\neval: {ce_contexts: '2'}\n")
    sweep = load_sweep(f)
    first = sweep.members[0].config
    assert (first.layers, first.batch_size, first.lr, first.k, first.sites) == ("2", 256, 1e-4, 4, "resid")
    assert [m.params["k"] for m in sweep.members] == [4, 4, 8, 8] and sweep.eval == {"ce_contexts": 2}
    flags = member_flags(first)
    assert flags[flags.index("--lr") + 1] == "0.0001" and flags[flags.index("--exclude-first") + 1] == "0"
    args = build_parser().parse_args(["train", str(run), *flags])  # what each member's `strata train` receives
    assert build_config(TrainConfig, None, given_flags(TrainConfig, args), run_dir=str(run), name="typed-0") == first


@pytest.mark.parametrize("body,message", [
    ("grid: {k: [4, 32.5]}", "grid: k=32.5 is not a valid int > 0"),
    ("base: {exclude_first: -1}\ngrid: {k: [4]}", "base: exclude_first=-1 is not a valid int >= 0"),
    ("grid: {arch: [topk, bogus]}", "grid: arch='bogus' is not a valid choice (relu, topk, batchtopk"),
    ("grid: {layers: ['0-x']}", "grid: layers='0-x': bad layer spec '0-x'"),
    ("random: {n: many, space: {k: [4]}}", "random.n: n='many' is not a valid int > 0"),
    ("random: {n: 2, seed: -1, space: {k: [4]}}", "random.seed: seed=-1 is not a valid int >= 0"),
    ("random: {n: 2, space: {wandb_mode: [online, sometimes]}}", "random.space: wandb_mode='sometimes'"),
    ("eval: {ce_contexts: -2}\ngrid: {k: [4]}", "eval: ce_contexts=-2 is not a valid int >= 0"),
])
def test_bad_sweep_values_are_refused_before_anything_is_written(run, tmp_path, body, message):
    from strata.sweep_config import load_sweep

    f = tmp_path / "s.yaml"
    f.write_text(f"run: {run}\nname: bad\n{body}\n")
    with pytest.raises(ConfigError) as e:
        load_sweep(f)
    assert message in str(e.value)
    assert not layout.sweep_dir(run, "bad").exists()


# ---------------------------------------------------------------- refused before any work
def test_bogus_explainer_is_refused_before_anything_loads(monkeypatch, capsys, tmp_path):
    import sae.analysis.analyze as analyze_module

    def analyze_called(cfg):
        raise AssertionError("analyze started although the explainer is not one of its choices")

    monkeypatch.setattr(analyze_module, "analyze", analyze_called)
    t0 = time.perf_counter()
    assert strata("analyze", tmp_path / "no-such-run", "--explainer", "bogus") == 2
    assert time.perf_counter() - t0 < 2
    err = capsys.readouterr().err
    assert err == "strata: error: --explainer: explainer='bogus' is not a valid choice (tokens, openai, " \
                  "transformers, none)\n"
