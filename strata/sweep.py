"""Sweeps: train many configs on one harvest run, each as its own `strata train` process, then compare them.

The config format is in strata/sweep_config.py. Member i trains as `strata train RUN --name <sweep>-<i> <flags>`
into RUN/train/<sweep>-<i>/ (its own metrics.jsonl; with `wandb_project` set, wandb groups the members under
the sweep name via WANDB_RUN_GROUP), `parallel` at a time; with `eval:` each finished member is `strata eval`-ed.
Rerunning the same config skips members whose checkpoint says done, resumes unfinished ones (--resume) and
retries failed ones. A failed member does not stop the others; `run_sweep` returns how many failed.

RUN/sweeps/<name>/sweep.json holds the config and each member's status:
    {"sweep", "run", "parallel", "eval", "base", "grid" | "random",
     "members": [{"name", "params", "status": pending|running|finished|failed|interrupted, "error", "command", "seconds"}]}
summary.json and frontier.html are written by strata/sweep_report.py (schema in its docstring).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from activations import layout
from activations.atomic import atomic_write_json
from sae.checkpoint import read_checkpoint
from sae.train_config import TrainConfig
from strata.sweep_config import SET_BY_SWEEP, Member, Sweep, jsonable, load_sweep


def member_flags(cfg: TrainConfig) -> list[str]:
    """`strata train` flags for every field that differs from the TrainConfig default."""
    default = TrainConfig()
    flags = []
    for f in dataclasses.fields(TrainConfig):
        v = getattr(cfg, f.name)
        if f.name in SET_BY_SWEEP or v is None or v == getattr(default, f.name):
            continue
        text = ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v)
        flags += ["--" + f.name.replace("_", "-"), text]
    return flags


def member_state(run: str, name: str) -> str:
    """'done' (checkpoint says finished), 'partial' (resumable), 'broken' (folder without config) or 'new'."""
    ckpt = read_checkpoint(run, name)
    if ckpt is not None and ckpt[0].get("done"):
        return "done"
    tdir = layout.train_dir(run, name)
    if (tdir / "config.json").is_file():
        return "partial"
    return "broken" if tdir.exists() else "new"


def _error_line(stderr: str, rc: int) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("strata: error:")]
    line = (errors or lines or [f"exit status {rc}"])[-1]
    return line.removeprefix("strata: error: ")[:300]


class Runner:
    """Runs members `parallel` at a time, keeping sweep.json current after every status change."""

    def __init__(self, sweep: Sweep, out=print):
        self.sweep, self._out = sweep, out
        self.lock, self.print_lock = threading.Lock(), threading.Lock()
        self.procs: set = set()
        self.stopping = False

    def out(self, line: str) -> None:
        with self.print_lock:
            self._out(line)

    def save(self) -> None:
        with self.lock:
            atomic_write_json(self.sweep.dir / "sweep.json", jsonable(self.sweep.record()))

    def env(self, cfg: TrainConfig) -> dict:
        env = dict(os.environ)
        if cfg.wandb_project:
            env["WANDB_RUN_GROUP"] = self.sweep.name
        # members share the CPU: split its threads among them instead of oversubscribing
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.sweep.parallel)))
        return env

    def call(self, args: list[str], cfg: TrainConfig) -> tuple[int, str]:
        with self.lock:
            if self.stopping:
                return 130, "interrupted"
            proc = subprocess.Popen([sys.executable, "-m", "strata.cli", *args], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, env=self.env(cfg))
            self.procs.add(proc)
        _, stderr = proc.communicate()
        with self.lock:
            self.procs.discard(proc)
        return proc.returncode, stderr

    def run_member(self, m: Member) -> None:
        t0 = time.perf_counter()
        state = member_state(self.sweep.run, m.name)
        extra = {"partial": ["--resume"], "broken": ["--overwrite"]}.get(state, [])
        args = ["train", self.sweep.run, "--name", m.name, *member_flags(m.config), "--progress", "false", *extra]
        m.command = "strata " + shlex.join(args)
        steps = [] if state == "done" else [("train", args)]
        evaluated = (layout.train_dir(self.sweep.run, m.name) / "eval.json").is_file()
        if self.sweep.eval is not None and (steps or not evaluated):
            ev = ["eval", self.sweep.run, "--name", m.name]
            for k, v in self.sweep.eval.items():
                ev += ["--" + k.replace("_", "-"), str(v)]
            steps.append(("eval", ev))
        if not steps:
            self.out(f"[{m.name}] finished earlier; skipped")
            m.status = "finished"
            self.save()
            return
        m.status, m.error = "running", ""
        self.save()
        self.out(f"[{m.name}] {'resuming' if state == 'partial' else 'starting'}: {' '.join(s for s, _ in steps)} "
                 f"{json.dumps(m.params)}")
        for what, a in steps:
            rc, stderr = self.call(a, m.config)
            if rc != 0:
                interrupted = rc in (130, -signal.SIGINT) or self.stopping
                m.status = "interrupted" if interrupted else "failed"
                m.error = f"{what}: {_error_line(stderr, rc)}"
                break
        else:
            m.status = "finished"
        m.seconds = round(time.perf_counter() - t0, 2)
        self.save()
        self.out(f"[{m.name}] {m.status} in {m.seconds:.1f} s" + (f": {m.error}" if m.error else ""))

    def run(self) -> None:
        self.sweep.dir.mkdir(parents=True, exist_ok=True)
        for m in self.sweep.members:
            if m.status != "finished":
                m.status, m.error = "pending", ""
        self.save()
        pool = ThreadPoolExecutor(max_workers=self.sweep.parallel)
        futures = [pool.submit(self.run_member, m) for m in self.sweep.members]
        try:
            for f in futures:
                f.result()
        except KeyboardInterrupt:
            with self.lock:
                self.stopping = True
                for p in self.procs:
                    p.send_signal(signal.SIGINT)
            pool.shutdown(wait=True, cancel_futures=True)
            for m in self.sweep.members:
                if m.status in ("running", "pending"):
                    m.status = "interrupted"
            self.save()
            raise
        pool.shutdown()


def run_sweep(config_path, parallel: int | None = None, dry_run: bool = False, out=print) -> int:
    """Run (or resume) a sweep; write sweep.json, summary.json, frontier.html; return the number of failed members."""
    from strata.sweep_report import format_table, write_report

    sweep = load_sweep(config_path, parallel)
    if dry_run:
        for m in sweep.members:
            out(f"{m.name}: {member_state(sweep.run, m.name)}  strata train {sweep.run} --name {m.name} "
                f"{' '.join(member_flags(m.config))}")
        return 0
    out(f"sweep {sweep.name}: {len(sweep.members)} members, {sweep.parallel} at a time -> {sweep.dir}")
    Runner(sweep, out).run()
    summary = write_report(sweep)
    out(format_table(summary))
    out(f"wrote {sweep.dir / 'summary.json'} and {sweep.dir / 'frontier.html'}")
    return sum(m.status != "finished" for m in sweep.members)
