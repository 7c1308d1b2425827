"""Metric records: always appended to RUN/train/<name>/metrics.jsonl (one JSON object per logged step), and
sent to Weights & Biases when a project is given. wandb offline mode needs no network or account; its files
go inside the train directory (WANDB_DIR)."""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from activations.atomic import atomic_write_bytes
from activations.errors import StrataError


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _step_of(line: str) -> float:
    """The step of one metrics.jsonl line; infinity for a blank, torn or foreign line (never kept on resume)."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else math.inf


class MetricsLogger:
    def __init__(self, path: Path, resume_step: int | None, wandb_project: str = "", wandb_mode: str = "online",
                 run_name: str = "", config: dict | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            # drop records written after the checkpoint we resume from (they will be logged again), and a last
            # line torn by a kill in the middle of its write
            keep = [ln for ln in self.path.read_text(errors="replace").splitlines() if _step_of(ln) <= resume_step]
            atomic_write_bytes(self.path, ("\n".join(keep) + "\n" if keep else "").encode())
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a")  # noqa: SIM115 -- appended to until close()
        self.wandb = None
        if wandb_project and wandb_mode != "disabled":
            if wandb_mode not in ("online", "offline"):
                raise StrataError(f"--wandb-mode {wandb_mode!r} is not one of online, offline, disabled")
            os.environ["WANDB_DIR"] = str(self.path.parent)
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            try:
                digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
                self.wandb = wandb.init(project=wandb_project, name=run_name, mode=wandb_mode, dir=str(self.path.parent),
                                        config=config or {}, id=f"{run_name}-{digest}", resume="allow")
            except Exception as e:  # noqa: BLE001 -- wandb raises many types (auth, network)
                raise StrataError(f"wandb could not start ({str(e).splitlines()[0][:120]}); use --wandb-mode offline or disabled") from None

    def log(self, record: dict) -> None:
        self.file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            flat = {}
            for k, v in record.items():
                if isinstance(v, dict):
                    for sid, m in v.items():
                        for mk, mv in (m.items() if isinstance(m, dict) else [("", m)]):
                            flat[f"{sid}/{mk}" if mk else sid] = mv
                elif isinstance(v, (int, float)):
                    flat[k] = v
            self.wandb.log(flat, step=int(record.get("step", 0)))

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
