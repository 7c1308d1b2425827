"""`strata <verb>`: each verb turns its flags into a config dataclass and calls one function.

Every verb's parser is built by an `add_<verb>` function below and dispatched through `args.run`.
Errors meant for users are `StrataError`s: printed as one line, exit status 2.
"""
from __future__ import annotations

import argparse
import re
import sys

from strata.install_check import exit_if_clash

exit_if_clash()  # before the first import from activations/, sae/ or dashboard/: those names may be someone else's

from activations.errors import StrataError  # noqa: E402
from strata.config import add_config_args, build_config, given_flags  # noqa: E402

# a value such as -1, -0.5, -1e-3 or -.5 (argparse's own test misses the exponent forms): no Strata option looks
# like a number, so these are always the value of the flag before them
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def join_negative_values(argv: list[str]) -> list[str]:
    """`--lr -1e-3` -> `--lr=-1e-3`: a negative number after a long flag is that flag's value, in any notation
    (argparse would take -1e-3 for an option)."""
    out: list[str] = []
    for arg in argv:
        if out and _NEGATIVE_NUMBER.match(arg) and out[-1].startswith("--") and "=" not in out[-1] and out[-1] != "--":
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


class Parser(argparse.ArgumentParser):
    """argparse with Strata's error format: one line `strata: error: <what> (see strata <verb> --help)`, exit 2;
    negative numbers in any notation are values."""

    def parse_known_args(self, args=None, namespace=None):
        """Unknown arguments are an error of the parser that met them (so the hint names the verb)."""
        args = join_negative_values(sys.argv[1:] if args is None else [str(a) for a in args])
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def error(self, message: str):
        self.exit(2, f"strata: error: {message} (see {self.prog} --help)\n")


def add_config_flags(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """`--config FILE` plus one flag per field of config dataclass `cls`."""
    p.add_argument("--config", metavar="FILE", help=f"YAML/JSON file with {cls.__name__} fields (flags win)")
    add_config_args(p, cls, skip=skip)


def add_run_verb(sub, verb: str, help_: str, cls, run_help: str, action):
    """A verb whose flags are the fields of config dataclass `cls` (plus RUN and --config FILE);
    `action(cfg)` does the work."""
    p = sub.add_parser(verb, help=help_, description=help_)
    p.add_argument("run_dir", metavar="RUN", help=run_help)
    add_config_flags(p, cls, skip=("run_dir",))
    p.set_defaults(run=lambda args: action(build_config(cls, args.config, given_flags(cls, args), run_dir=args.run_dir)))
    return p


# ---------------------------------------------------------------- harvest / verify / info (activations/)
def add_harvest(sub):
    from activations.config import HarvestConfig

    def run(cfg):
        from activations.harvest import harvest

        harvest(cfg)

    add_run_verb(sub, "harvest", "run a model over text and store activations as per-layer HDF5 shards",
                 HarvestConfig, "run directory to write (created if missing)", run)


def add_synth(sub):
    from activations.synth import SynthConfig

    def run(cfg):
        from activations.synth import synthesize

        m = synthesize(cfg)
        print(f"wrote {m.n_tokens:,} synthetic tokens x {len(m.keys)} keys to {cfg.run_dir} (truth in "
              f"{cfg.run_dir}/synth/)")

    add_run_verb(sub, "synth", "write a synthetic run made of known features across depth (the truth eval's test bed)",
                 SynthConfig, "run directory to write (created if missing)", run)


def add_verify(sub):
    p = sub.add_parser("verify", help="check a run's shards against its manifest (checksums, shapes, NaN/inf)")
    p.add_argument("run_dir")

    def run(args):
        from activations.verify import repair_command, verify_run

        problems = verify_run(args.run_dir)
        if problems:
            for line in problems:
                print(line)
            raise StrataError(f"{len(problems)} problem(s) in {args.run_dir}: `{repair_command(args.run_dir)}` re-creates "
                              f"the missing and damaged shard files")
        print(f"{args.run_dir}: all shards match the manifest")

    p.set_defaults(run=run)


def add_info(sub):
    p = sub.add_parser("info", help="print a summary of a run directory")
    p.add_argument("run_dir")

    def run(args):
        from activations.verify import run_summary

        print(run_summary(args.run_dir))

    p.set_defaults(run=run)


def add_demo(sub):
    from strata.pipeline import DemoConfig

    p = sub.add_parser("demo", help="harvest -> train -> eval -> analyze -> dashboard on the embedded default (offline)")
    add_config_flags(p, DemoConfig)

    def run(args):
        from strata.pipeline import run_demo

        run_demo(build_config(DemoConfig, args.config, given_flags(DemoConfig, args)))

    p.set_defaults(run=run)


# ---------------------------------------------------------------- verbs added by later stages go below
def add_graph(sub):
    from sae.circuits.graph import GraphConfig

    def run(cfg):
        from sae.circuits.graph import make_graph

        path, meta = make_graph(cfg)
        print(f"wrote {path}: {len(meta['prompt_ids'])} tokens, {meta['n_nodes_before']} nodes before pruning, "
              f"influence kept {meta['influence_kept']:.3f}, replacement {meta['replacement_score']:.3f}, "
              f"completeness {meta['completeness_score']:.3f} ({meta['seconds']:.1f} s)")

    add_run_verb(sub, "graph",
                 "attribution graph of one prompt on a run's transcoders or CLT (RUN/graphs/<name>/<graph>.json)",
                 GraphConfig, "run directory with train/<name> (mode transcoder or clt)", run)



# ---------------------------------------------------------------- analyze / dashboard / share (sae/analysis, dashboard/)
def add_analyze(sub):
    from sae.analysis.analyze import AnalyzeConfig

    def run(cfg):
        from sae.analysis.analyze import analyze

        for path in analyze(cfg):
            print(f"wrote {path}")

    add_run_verb(sub, "analyze", "index every feature of trained SAEs (stats, contexts, logits, depth, explanations)",
                 AnalyzeConfig, "run directory with train/<name>/checkpoint", run)

def add_dashboard(sub):
    p = sub.add_parser("dashboard", help="serve the Streamlit dashboard of a run")
    p.add_argument("run_dir")
    p.add_argument("--read-only", action="store_true", help="serve without the prompt explorer (for sharing)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="localhost", help="address to listen on (0.0.0.0 to share on a network)")

    def run(args):
        from dashboard.serve import serve_dashboard

        serve_dashboard(args.run_dir, read_only=args.read_only, port=args.port, host=args.host)

    p.set_defaults(run=run)


def add_share(sub):
    p = sub.add_parser("share", help="write a static HTML bundle of feature pages (opens with no Python, no network)")
    p.add_argument("run_dir")
    p.add_argument("--features", default="best:100",
                   help="best:N (the N most interpretable per SAE: the Features page's default order, always-on and "
                        "outlier-only features left out) | top:N (densest N per SAE) | all | 1,2,5-9 | sae:1,2;sae2:3 "
                        "(default: best:100)")
    p.add_argument("--name", help="share only this training run (default: every one that has a feature index)")
    p.add_argument("--out", help="output folder (default: RUN/share)")

    def run(args):
        from dashboard.share import write_share

        out = write_share(args.run_dir, args.features, args.name, args.out)
        print(f"wrote {out / 'index.html'}")

    p.set_defaults(run=run)




def add_intervene(sub):
    from sae.circuits.intervene import InterveneConfig

    def run(cfg):
        from sae.circuits.intervene import run_intervention

        print(run_intervention(cfg))

    add_run_verb(sub, "intervene", "zero or scale SAE features on a prompt and show the change in logits and deeper "
                 "features; steer generation with a feature", InterveneConfig, "run directory with train/<name>", run)


# ---------------------------------------------------------------- train / eval / export / import (sae/)
def add_train(sub):
    from sae.train_config import TrainConfig

    def run(cfg):
        from sae.train import train

        print(f"trained SAEs written to {train(cfg)}")

    add_run_verb(sub, "train", "train SAEs on a harvest run (per-layer bank, multilayer, transcoder, crosscoder)",
                 TrainConfig, "harvest run directory", run)

def add_eval(sub):
    from sae.evaluate import EvalConfig

    def run(cfg):
        from sae.evaluate import evaluate, format_report

        print(format_report(evaluate(cfg)))

    add_run_verb(sub, "eval", "evaluate trained SAEs on held-out shards (metrics, CE/KL loss recovered)",
                 EvalConfig, "harvest run directory with train/<name>", run)


def add_export(sub):
    p = sub.add_parser("export", help="write trained SAEs in another tool's format (SAELens)")
    p.add_argument("run_dir")
    p.add_argument("--name", required=True, help="training run name (RUN/train/<name>)")
    p.add_argument("--format", default="saelens", choices=["saelens"])
    p.add_argument("--out", required=True, help="folder to write (one sub-folder per SAE and key)")
    p.add_argument("--sae", default=None, help="export only this SAE id")

    def run(args):
        from sae.saelens import export_saelens

        for folder in export_saelens(args.run_dir, args.name, args.out, args.sae):
            print(folder)

    p.set_defaults(run=run)


def add_import(sub):
    p = sub.add_parser("import", help="bring a SAELens SAE folder into a run so it can be analysed and browsed")
    p.add_argument("run_dir")
    p.add_argument("folder", help="SAELens folder (cfg.json + sae_weights.safetensors)")
    p.add_argument("--name", required=True, help="training run name to create (RUN/train/<name>)")
    p.add_argument("--key", default=None, help="activation key it reads, e.g. resid.3 (default: from its hook_name)")

    def run(args):
        from sae.saelens import import_saelens

        print(f"imported as {import_saelens(args.run_dir, args.folder, args.name, args.key)}")

    p.set_defaults(run=run)


VERBS = [add_demo, add_harvest, add_synth, add_verify, add_info, add_analyze, add_dashboard, add_share, add_train, add_eval,
         add_export, add_import, add_graph, add_intervene]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="strata", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS:
        add(sub)
    return parser


def report_errors(prog: str, action, interrupted: str) -> int:
    """The exit status action() returns; a StrataError is printed as one line `<prog>: error: <what>` (exit 2),
    Ctrl-C as `<prog>: <interrupted>` (exit 130)."""
    try:
        return action()
    except StrataError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error, already printed as one line (2)
        return e.code if isinstance(e.code, int) else 2

    def run() -> int:
        args.run(args)
        return 0

    return report_errors("strata", run, "interrupted; finished shards and checkpoints are kept (rerun with --resume)")


if __name__ == "__main__":
    sys.exit(main())
