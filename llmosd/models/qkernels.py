"""A hand-written AVX-512 kernel for quantized matmuls of a few rows (decode), on the CPU.

``torch.compile``'s reduction kernel (``quant._mm_reduce``) reaches ~6 GMAC/s on one core and
each compiled call costs ~60 us of Dynamo/AOT wrappers (a decode step makes ~200 such calls).
This kernel reads the packed weight once per call for up to 8 rows, unpacks a group of 32
nibbles (or int8 values) into two float vectors scaled by the group's scale, and accumulates
``x * w`` with FMAs; the 4-bit minimum enters as ``min * sum(x of the group)``.  It is C with
intrinsics, compiled once per process with the system's C compiler (as inductor needs one too)
and called through ctypes (which releases the GIL): ~3 us per call instead of ~60, and 2-3x
fewer cycles per weight.  Threads: OpenMP over output rows, sharing torch's libgomp.

``load()`` returns None where it cannot run (not x86-64 with AVX-512F, no compiler, a compile
or self-check failure): callers keep the torch paths.  Float32 activations only; the sums are
in another order than a float GEMM's (differences at float32 rounding level).
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import torch

log = logging.getLogger("llmosd.quant")
MAX_ROWS = 8                      # rows one kernel call computes (its accumulators are registers)

SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#define GS 32
typedef _Float16 half;

static inline __attribute__((always_inline)) void row4(const float *x, const int M, int K, int G,
        const uint8_t *q, const half *s, const half *m, const float *xs, float *y, int N, int n) {
    __m512 acc[8]; float am[8];
    for (int r = 0; r < M; r++) { acc[r] = _mm512_setzero_ps(); am[r] = 0; }
    const uint8_t *qn = q + (size_t)n * (K / 2);
    const half *sn = s + (size_t)n * G, *mn = m + (size_t)n * G;
    const __m128i low = _mm_set1_epi8(15);
    for (int g = 0; g < G; g++) {
        __m512 sc = _mm512_set1_ps((float)sn[g]);
        __m128i b = _mm_loadu_si128((const __m128i *)(qn + g * 16));
        __m512 wl = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, low))), sc);
        __m512 wh = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low))), sc);
        float mg = (float)mn[g];
        for (int r = 0; r < M; r++) {
            const float *xr = x + (size_t)r * K + g * GS;
            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), wl, acc[r]);
            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), wh, acc[r]);
            am[r] += mg * xs[r * G + g];
        }
    }
    for (int r = 0; r < M; r++) y[(size_t)r * N + n] = _mm512_reduce_add_ps(acc[r]) + am[r];
}

static inline __attribute__((always_inline)) void row8(const float *x, const int M, int K, int G,
        const int8_t *q, const half *s, float *y, int N, int n) {
    __m512 acc[8];
    for (int r = 0; r < M; r++) acc[r] = _mm512_setzero_ps();
    const int8_t *qn = q + (size_t)n * K;
    const half *sn = s + (size_t)n * G;
    for (int g = 0; g < G; g++) {
        __m512 sc = _mm512_set1_ps((float)sn[g]);
        __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qn + g * GS)))), sc);
        __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qn + g * GS + 16)))), sc);
        for (int r = 0; r < M; r++) {
            const float *xr = x + (size_t)r * K + g * GS;
            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, acc[r]);
            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), w1, acc[r]);
        }
    }
    for (int r = 0; r < M; r++) y[(size_t)r * N + n] = _mm512_reduce_add_ps(acc[r]);
}

#define DISPATCH(BODY) switch (M) { \
    case 1: { BODY(1); break; } case 2: { BODY(2); break; } case 3: { BODY(3); break; } \
    case 4: { BODY(4); break; } case 5: { BODY(5); break; } case 6: { BODY(6); break; } \
    case 7: { BODY(7); break; } default: { BODY(8); break; } }

/* y (M, N) = x (M, K) @ W.T for a 4-bit W in GGUF's nibble layout; 1 <= M <= 8, K % 32 == 0. */
void qk_mm4(const float *x, int M, int K, const uint8_t *q, const half *s, const half *m,
            int N, float *y, int nt) {
    int G = K / GS;
    float xs[M * G + 1];
    for (int r = 0; r < M; r++) for (int g = 0; g < G; g++) {
        float t = 0; for (int j = 0; j < GS; j++) t += x[(size_t)r * K + g * GS + j]; xs[r * G + g] = t; }
    #define B4(MM) for (int n = n0; n < n1; n++) row4(x, MM, K, G, q, s, m, xs, y, N, n)
    #pragma omp parallel num_threads(nt) if(nt > 1)
    {
        int t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(); T = omp_get_num_threads();
#endif
        int n0 = (int)((long)N * t / T), n1 = (int)((long)N * (t + 1) / T);
        DISPATCH(B4)
    }
}

void qk_mm8(const float *x, int M, int K, const int8_t *q, const half *s, int N, float *y, int nt) {
    int G = K / GS;
    #define B8(MM) for (int n = n0; n < n1; n++) row8(x, MM, K, G, q, s, y, N, n)
    #pragma omp parallel num_threads(nt) if(nt > 1)
    {
        int t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(); T = omp_get_num_threads();
#endif
        int n0 = (int)((long)N * t / T), n1 = (int)((long)N * (t + 1) / T);
        DISPATCH(B8)
    }
}
"""


def _has_avx512() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return all(f in flags.split() for f in ("avx512f", "fma", "f16c"))


def _compile(workdir: str) -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler")
    c, so = os.path.join(workdir, "qk.c"), os.path.join(workdir, "qk.so")
    with open(c, "w") as f:
        f.write(SOURCE)
    base = [cc, "-O3", "-mavx512f", "-mfma", "-mf16c", "-shared", "-fPIC", c, "-o", so]
    err = ""
    for extra in (["-fopenmp"], []):                 # without OpenMP: one thread, still correct
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            break
        err = r.stderr[-500:]
    else:
        raise RuntimeError(f"the C compiler failed: {err}")
    lib = ctypes.CDLL(so)
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.qk_mm4.argtypes = [P, I, I, P, P, P, I, P, I]
    lib.qk_mm8.argtypes = [P, I, I, P, P, I, P, I]
    lib.qk_mm4.restype = lib.qk_mm8.restype = None
    return lib


class CKernel:
    """The loaded kernel: ``mm(x, qweight, scales, mins)`` = x @ W.T for float32 x (M, K)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    @staticmethod
    def fits(x: torch.Tensor, scales: torch.Tensor) -> bool:
        """Whether this kernel takes these operands (CPU, float32 rows, float16 group scales)."""
        return x.dtype == torch.float32 and x.device.type == "cpu" and scales.dtype == torch.float16

    def mm(self, x: torch.Tensor, qweight, scales, mins) -> torch.Tensor:
        x = x.contiguous()
        M, K = x.shape
        N = scales.shape[0]
        y = x.new_empty(M, N)
        nt = torch.get_num_threads()
        q, s = qweight.contiguous(), scales.contiguous()
        m = None if mins is None else mins.contiguous()
        for r0 in range(0, M, MAX_ROWS):             # each chunk of rows re-reads the weight
            r = min(MAX_ROWS, M - r0)
            xp, yp = x[r0:].data_ptr(), y[r0:].data_ptr()
            if m is None:
                self.lib.qk_mm8(xp, r, K, q.data_ptr(), s.data_ptr(), N, yp, nt)
            else:
                self.lib.qk_mm4(xp, r, K, q.data_ptr(), s.data_ptr(), m.data_ptr(), N, yp, nt)
        return y


_LOCK = threading.Lock()
_STATE: dict = {}


def load(quantize, dequantize) -> CKernel | None:
    """The process's kernel, compiled and checked on first use against ``dequantize`` of
    ``quantize``d random weights (``models.quant``'s: passed in, so this module needs nothing
    of it); None where it cannot run."""
    with _LOCK:
        if "k" not in _STATE:
            _STATE["k"] = _build(quantize, dequantize)
        return _STATE["k"]


def _build(quantize, dequantize) -> CKernel | None:
    if os.environ.get("LLMOSD_CKERNEL", "auto") == "off" or not _has_avx512():
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="llmosd-qk-") as d:
            k = CKernel(_compile(d))                 # the mapped library outlives its file
        _self_check(k, quantize, dequantize)
    except Exception as e:                           # no compiler, an odd toolchain: torch paths
        log.info("the C quantized kernel is not available (%s)", e)
        return None
    return k


def _self_check(k: CKernel, quantize, dequantize) -> None:
    g = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        w = quantize(torch.randn(40, 96, generator=g), bits)
        ref_w = dequantize(w["qweight"], w["scales"], w.get("mins"))
        for M in (1, 3, 11):
            x = torch.randn(M, 96, generator=g)
            got = k.mm(x, w["qweight"], w["scales"], w.get("mins"))
            if not torch.allclose(got, x @ ref_w.t(), atol=1e-4, rtol=1e-4):
                raise RuntimeError(f"the C kernel disagrees with the reference ({bits} bits, {M} rows)")
