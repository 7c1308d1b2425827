"""Each row's k largest entries on CPU in one compiled pass: the top-k selection of the TopK family's training step.

torch's CPU topk partially sorts every row (~7 ns per entry); kernels.topk_rows cuts that with a chain of torch ops
(group maxima, their topk, a gather, a threshold), each a full pass with its own allocation. This does the same
exact selection per row in cache, without temporaries:
  1. the maxima of the row's chunks of 64 bytes (32 bf16 or 16 fp32 entries), compared as integer keys that order
     like the floats (NaN above +inf, as torch.topk puts it): a vectorised pass over the row;
  2. tau = the k-th largest chunk maximum. It is a lower bound of the row's k-th largest entry (k chunks hold an
     entry >= tau), so only the chunks whose maximum reaches tau can hold a top-k entry;
  3. those chunks' entries >= tau (about k of them) are the candidates; nth_element keeps the k largest.
Ties at the k-th value may pick another of the equal entries, as torch.topk may.

The C++ source below is compiled once per machine with the system's C++ compiler ($CXX, else c++) into
$STRATA_CACHE/native (default ~/.cache/strata), keyed by the source, the compiler and the CPU's model and flags
(activations.precision.machine_id), and called through ctypes. The rows are split over torch.get_num_threads()
OpenMP threads. The library asks for libgomp.so.1, which the loader resolves to the copy torch has already loaded
(torch's Linux wheels ship it under that name), so the work goes to torch's own workers, still spinning from the
encoder matmul; threads of our own would fight them for the cores (3.2 vs 1.6 ms per 1,024 bf16 rows of 4,608 on
2 cores). A compiler without OpenMP gets a thread pool instead. Where no compiler works, `available()` is False
and kernels.topk_rows keeps its torch path; `status()` says which is in use.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from activations.model import cache_root
from activations.precision import machine_id

SOURCE = r"""
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

// Integer keys ordered like the floats they encode (negative floats reversed, sign bit flipped).
static inline uint16_t key16(uint16_t b) { return b ^ (uint16_t)((uint16_t)((int16_t)b >> 15) | 0x8000u); }
static inline uint32_t key32(uint32_t b) { return b ^ ((uint32_t)((int32_t)b >> 31) | 0x80000000u); }
static inline uint16_t key(uint16_t b) { return key16(b); }
static inline uint32_t key(uint32_t b) { return key32(b); }

template <typename U, int C>
static void rows_topk(const U* pre, int64_t rows, int64_t n, int64_t stride, int64_t k, U* out_v, int64_t* out_c) {
    const int64_t chunks = n / C;
    std::vector<U> cmax(chunks + 1);
    std::vector<U> order(chunks + 1);
    std::vector<std::pair<U, int64_t>> cand;
    cand.reserve(4 * k + C);
    for (int64_t r = 0; r < rows; ++r) {
        const U* p = pre + r * stride;
        for (int64_t c = 0; c < chunks; ++c) {  // 1. chunk maxima of the keys
            const U* q = p + c * C;
            U m = 0;
            for (int t = 0; t < C; ++t) { U v = key(q[t]); m = v > m ? v : m; }
            cmax[c] = m;
        }
        int64_t nc = chunks;
        if (n % C) {  // the short last chunk
            U m = 0;
            for (int64_t j = chunks * C; j < n; ++j) { U v = key(p[j]); m = v > m ? v : m; }
            cmax[nc++] = m;
        }
        U tau;  // 2. the k-th largest chunk maximum (every entry, when there are fewer chunks than k)
        if (nc > k) {
            std::copy(cmax.begin(), cmax.begin() + nc, order.begin());
            std::nth_element(order.begin(), order.begin() + (k - 1), order.begin() + nc, std::greater<U>());
            tau = order[k - 1];
        } else {
            tau = 0;
        }
        cand.clear();  // 3. the entries >= tau of the chunks that reach it
        for (int64_t c = 0; c < nc; ++c) {
            if (cmax[c] < tau) continue;
            const int64_t end = std::min(n, (c + 1) * C);
            for (int64_t j = c * C; j < end; ++j) {
                U v = key(p[j]);
                if (v >= tau) cand.emplace_back(v, j);
            }
        }
        std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(),
                         [](const std::pair<U, int64_t>& a, const std::pair<U, int64_t>& b) { return a.first > b.first; });
        for (int64_t i = 0; i < k; ++i) {
            out_c[r * k + i] = cand[i].second;
            out_v[r * k + i] = p[cand[i].second];
        }
    }
}

template <typename U, int C>
static void split_rows(const U* pre, int64_t rows, int64_t n, int64_t stride, int64_t k, U* v, int64_t* c,
                       int64_t threads) {
    // OpenMP: the same runtime torch runs on (its workers, still spinning after the encoder matmul, take the shares)
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (int64_t t = 0; t < threads; ++t) {
        const int64_t lo = rows * t / threads, hi = rows * (t + 1) / threads;
        rows_topk<U, C>(pre + lo * stride, hi - lo, n, stride, k, v + lo * k, c + lo * k);
    }
}

extern "C" {
int uses_openmp() {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
void topk_rows_bf16(const uint16_t* pre, int64_t rows, int64_t n, int64_t stride, int64_t k, uint16_t* v, int64_t* c,
                    int64_t threads) {
    split_rows<uint16_t, 32>(pre, rows, n, stride, k, v, c, threads);
}
void topk_rows_f32(const uint32_t* pre, int64_t rows, int64_t n, int64_t stride, int64_t k, uint32_t* v, int64_t* c,
                   int64_t threads) {
    split_rows<uint32_t, 16>(pre, rows, n, stride, k, v, c, threads);
}
}
"""

FUNCTIONS = {torch.bfloat16: "topk_rows_bf16", torch.float32: "topk_rows_f32"}
MIN_ROWS_PER_THREAD = 64


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the compiled library, what happened), built once per process; (None, why) where it cannot be built."""
    if platform.system() not in ("Linux", "Darwin"):
        return None, f"no compiled top-k on {platform.system()}"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found ($CXX, c++, g++, clang++)"
    machine = f"{platform.machine()} {machine_id(torch.device('cpu'))}"  # the CPU's model and flags, as the probe's
    digest = hashlib.sha256("\0".join([SOURCE, cxx, machine]).encode()).hexdigest()[:16]
    target = cache_root() / "native" / f"cpu_select-{digest}.so"
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src, out = Path(tmp) / "cpu_select.cpp", Path(tmp) / "cpu_select.so"
                src.write_text(SOURCE)
                base = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", str(src), "-o", str(out)]
                # the machine's vector units and torch's OpenMP runtime, where the compiler allows
                for flags in (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []):
                    done = subprocess.run(base[:2] + flags + base[2:], capture_output=True, text=True, timeout=120)
                    if done.returncode == 0:
                        break
                else:
                    return None, f"compiling the top-k kernel failed: {(done.stderr.strip() or '?').splitlines()[-1]}"
                os.replace(out, target)  # atomic: concurrent processes each install a whole library
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"compiling the top-k kernel failed: {e}"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"loading {target} failed: {e}"
    for name in FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
    lib.uses_openmp.argtypes, lib.uses_openmp.restype = [], ctypes.c_int
    return lib, f"compiled top-k ({target})"


def available() -> bool:
    return _library()[0] is not None


def status() -> str:
    """Which top-k the TopK training step uses on CPU, and why."""
    return _library()[1] if available() else f"torch top-k ({_library()[1]})"


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="strata-topk")


def supports(pre_BN: torch.Tensor, k: int) -> bool:
    """Whether topk_rows takes this tensor: CPU, bf16 or fp32, rows contiguous, 0 < k <= n, compiled kernel built."""
    return (pre_BN.device.type == "cpu" and pre_BN.dtype in FUNCTIONS and pre_BN.dim() == 2
            and pre_BN.stride(1) == 1 and 0 < k <= pre_BN.shape[1] and available())


def topk_rows(pre_BN: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [B, k] in pre_BN's dtype, columns [B, k] int64), unsorted: each row's k largest entries (see module
    docstring). Needs supports(pre_BN, k)."""
    B, n = pre_BN.shape
    fn = getattr(_library()[0], FUNCTIONS[pre_BN.dtype])
    vals_BK = torch.empty(B, k, dtype=pre_BN.dtype)
    cols_BK = torch.empty(B, k, dtype=torch.int64)
    stride, item = pre_BN.stride(0), pre_BN.element_size()

    def part(lo: int, hi: int, threads: int) -> None:
        fn(pre_BN.data_ptr() + lo * stride * item, hi - lo, n, stride, k,
           vals_BK.data_ptr() + lo * k * item, cols_BK.data_ptr() + lo * k * 8, threads)

    threads = max(1, min(torch.get_num_threads(), B // MIN_ROWS_PER_THREAD))
    if threads == 1 or _library()[0].uses_openmp():
        part(0, B, threads)
    else:  # no OpenMP: a thread of ours per share (ctypes releases the GIL)
        bounds = [B * i // threads for i in range(threads + 1)]
        rest = [_pool(threads - 1).submit(part, lo, hi, 1) for lo, hi in zip(bounds[1:], bounds[2:])]
        part(bounds[0], bounds[1], 1)  # the calling thread takes the first share
        for f in rest:
            f.result()
    return vals_BK, cols_BK
