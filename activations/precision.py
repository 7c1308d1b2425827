"""`--precision auto|fp32|bf16`: the dtype the heavy matmuls run in (model forward, SAE encoder).

`auto` measures instead of guessing: bf16 is ~3x faster than fp32 on CPUs with AVX-512-BF16/AMX and on CUDA
GPUs with bf16 units, but ~8x slower on CPUs without them. A one-off probe times fp32 and bf16 matmuls of the
shapes in use and picks bf16 only where it is at least BF16_MIN_SPEEDUP faster. The timings are cached per
machine, torch version, device and shape in $STRATA_CACHE/precision.json (default ~/.cache/strata), so later
commands pay nothing. Master weights and optimiser state stay fp32 whatever is chosen.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from activations.atomic import atomic_write_json
from activations.errors import StrataError
from activations.model import cache_root

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BF16_MIN_SPEEDUP = 1.5
PROBE_FLOP = 4e8  # per timing of one shape and dtype (the whole probe takes well under a second)
PROBE_REPS = 5
PROBE_VERSION = 3  # part of the cache key: a changed probe measures again


@dataclass(frozen=True)
class Precision:
    """What a command computes in and why (printed, and recorded in the manifest / training config)."""
    name: str    # "fp32" or "bf16"
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def record(self) -> dict:
        return {"precision": self.name, "reason": self.reason}

    def line(self) -> str:
        return f"precision: {self.name} ({self.reason})"


def choose(device: torch.device, shapes, timings: dict | None = None) -> tuple[str, str]:
    """(dtype name, reason) for `--precision auto`: bf16 iff the device supports it and its matmuls of `shapes`
    took at most 1/BF16_MIN_SPEEDUP of fp32's. `timings` ({"fp32": s, "bf16": s or None}) are what the probe
    measured; None measures them now (cached). Deterministic given the timings."""
    device = torch.device(device)
    if not bf16_supported(device):
        return "fp32", f"{_where(device)} has no bf16 support"
    timings = timings if timings is not None else probe(device, shapes)
    fp32, bf16 = timings["fp32"], timings.get("bf16")
    if bf16 is None or bf16 <= 0 or fp32 <= 0:
        return "fp32", f"bf16 matmul unavailable on {_where(device)}"
    speedup = fp32 / bf16
    if bf16 * BF16_MIN_SPEEDUP <= fp32:
        return "bf16", f"bf16 matmul {speedup:.1f}x faster than fp32 on {_where(device)}"
    if speedup >= 1:
        return "fp32", f"bf16 matmul only {speedup:.1f}x faster than fp32 on {_where(device)} (needs {BF16_MIN_SPEEDUP}x)"
    return "fp32", f"bf16 matmul {1 / speedup:.1f}x slower than fp32 on {_where(device)}"


def resolve(requested: str, device, shapes, timings: dict | None = None) -> Precision:
    """The Precision for a command's `--precision` value: fp32/bf16 as asked (bf16 refused where the device
    cannot), auto as `choose` decides."""
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise StrataError(f"unknown --precision {requested!r}; use one of {', '.join(PRECISIONS)}")
    if requested == "bf16" and not bf16_supported(device):
        raise StrataError(f"--precision bf16: {_where(device)} has no bf16 support; use --precision fp32 or auto")
    if requested != "auto":
        return Precision(requested, "asked for with --precision")
    name, reason = choose(device, shapes, timings)
    cached = f", probe cached in {cache_path()}" if timings is None and bf16_supported(device) else ""
    return Precision(name, reason + cached)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"  # torch always runs bf16 on CPU; the probe tells fast units from emulation


def _where(device: torch.device) -> str:
    return f"this GPU ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "this CPU"


# ---------------------------------------------------------------------------------------------------- probe
def probe(device: torch.device, shapes) -> dict:
    """Best-of-PROBE_REPS seconds for fp32 and bf16 matmuls [m, k] x [k, n] of each shape, summed; cached."""
    device = torch.device(device)
    shapes = sorted({tuple(int(v) for v in s) for s in shapes})
    key = cache_key(device, shapes)
    path = cache_path()
    cache = _read_cache(path)
    if key in cache:
        return cache[key]
    per_shape = [_time_matmuls(device, s) for s in shapes]
    timings = {name: sum(t[name] for t in per_shape) for name in DTYPES}
    cache[key] = timings
    try:
        atomic_write_json(path, cache)
    except OSError:
        pass  # a read-only home only costs the probe again next time
    return timings


def _time_matmuls(device: torch.device, shape: tuple) -> dict[str, float]:
    """Seconds per [m, k] x [k, n] matmul in each dtype, the best of PROBE_REPS timings. The dtypes take turns, so
    a burst of load from elsewhere slows a timing of each rather than every timing of one: timed fp32 first and bf16
    after, a probe once cached bf16 as 4.3x slower on a CPU where it is 3-5x faster, and every later command here
    ran in fp32. Rows are cut so one matmul is at most PROBE_FLOP, and small ones are repeated up to PROBE_FLOP per
    timing (a single microsecond matmul is all timer noise)."""
    m, k, n = shape
    rows = max(1, min(m, int(PROBE_FLOP // (2 * k * n))))
    repeat = max(1, min(200, int(PROBE_FLOP // (2 * rows * k * n))))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    operands = {}
    for name, dtype in DTYPES.items():
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(rows, k, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, k, generator=gen).to(device=device, dtype=dtype).t()  # W_enc / nn.Linear layout
        _timed(a, b, 1, sync)  # warm-up (allocations, kernel selection)
        operands[name] = (a, b)
    best = dict.fromkeys(operands, float("inf"))
    for _ in range(PROBE_REPS):
        for name, (a, b) in operands.items():
            best[name] = min(best[name], _timed(a, b, repeat, sync))
    return {name: t / repeat * (m / rows) for name, t in best.items()}


def _timed(a: torch.Tensor, b: torch.Tensor, repeat: int, sync) -> float:
    """Seconds for `repeat` matmuls a @ b."""
    t = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync()
    return time.perf_counter() - t


def machine_id(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name plus a hash of its feature flags."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and ":" in line:
                flags = line.split(":", 1)[1].strip()
            if model and flags:
                break
    except OSError:
        pass
    return f"{model} flags:{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def cache_key(device: torch.device, shapes) -> str:
    shape_text = ",".join("x".join(str(v) for v in s) for s in shapes)
    return f"{machine_id(device)} | torch {torch.__version__} | {device.type} | {shape_text} | probe {PROBE_VERSION}"


def cache_path() -> Path:
    return cache_root() / "precision.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    good = {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("fp32"), (int, float))} \
        if isinstance(data, dict) else {}
    return good
