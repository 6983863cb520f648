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

from llmosd.models import cstep

log = logging.getLogger("llmosd.quant")
TOLERANCE = 0.02          # int8 activations: |error| / max |y| the self-check accepts

SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#define GS 32
typedef _Float16 half;

/* activations of up to 8 rows, quantized per group of 32 as llama.cpp's q8_0 (VNNI builds) */
typedef struct { int8_t *xn, *xp; float *d, *xs; } QX;

#ifdef QK_VNNI
/* x (R, K) -> per group: d = max|x| / 127, xn = round(x / d) in order, xp the same with each
   pair of groups interleaved by halves [g 0-15, g+1 0-15, g 16-31, g+1 16-31] (the order of
   unpacked nibble pairs), xs = d * sum of xn (the 4-bit minimum meets the same quantized x
   as the nibbles: their errors cancel as in w = nibble * scale + min). */
static void quant_x(const float *x, int R, int K, QX *o) {
    int G = K / GS;
    for (int r = 0; r < R; r++) for (int g = 0; g < G; g++) {
        const float *xg = x + (size_t)r * K + g * GS;
        __m512 a = _mm512_loadu_ps(xg), b = _mm512_loadu_ps(xg + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        float d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
        __m512i ia = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
        __m512i ib = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(id)));
        o->d[r * G + g] = d;
        o->xs[r * G + g] = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(ia, ib));
        __m128i qa = _mm512_cvtsepi32_epi8(ia), qb = _mm512_cvtsepi32_epi8(ib);
        int8_t *n = o->xn + (size_t)r * K + g * GS;
        _mm_storeu_si128((__m128i *)n, qa); _mm_storeu_si128((__m128i *)(n + 16), qb);
        int8_t *p = o->xp + (size_t)r * K + (g & ~1) * GS + (g & 1) * 16;
        if ((g | 1) < G) { _mm_storeu_si128((__m128i *)p, qa); _mm_storeu_si128((__m128i *)(p + 32), qb); }
        else { _mm_storeu_si128((__m128i *)p, qa); _mm_storeu_si128((__m128i *)(p + 16), qb); }  /* odd tail: in order */
    }
}

static inline float hsum8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e)); s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return (float)_mm_cvtsi128_si32(s);
}

/* lane -> group of a pair's 512-bit dot product, for pair j of a block of 16 groups: 4-bit
   [2j x4, 2j+1 x4, 2j x4, 2j+1 x4] (nibbles lo, lo, hi, hi); 8-bit [2j x8, 2j+1 x8] */
static int IDX4[8][16], IDX8[8][16];
__attribute__((constructor)) static void qk_init(void) {
    for (int j = 0; j < 8; j++) for (int i = 0; i < 16; i++) {
        IDX4[j][i] = 2 * j + ((i >> 2) & 1); IDX8[j][i] = 2 * j + (i >> 3); }
}

/* the scales of groups g..g+nb-1 of row n (float16), times each row's d_x: ds[r] */
#define BLOCK_SCALES(M) \
    __mmask16 km = (__mmask16)((1u << nb) - 1); \
    __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, sn + g)); \
    for (int r = 0; r < M; r++) ds[r] = _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(km, o->d + r * G + g));

/* y[r, n] for 4-bit row n: sum over groups of scale * d_x * (nibbles . x_q) + min * d_x * sum(x_q) */
static inline __attribute__((always_inline)) void row4(const QX *o, const int M, int K, int G,
        const uint8_t *q, const half *s, const half *m, float *y, int N, int n) {
    __m512 acc[8], am[8], ds[8];
    const uint8_t *qn = q + (size_t)n * (K / 2);
    const half *sn = s + (size_t)n * G, *mn = m + (size_t)n * G;
    for (int r = 0; r < M; r++) { acc[r] = _mm512_setzero_ps(); am[r] = _mm512_setzero_ps(); }
    const __m512i low = _mm512_set1_epi8(15);
    int Gp = G & ~1;
    for (int g = 0; g < Gp; g += 16) {
        int nb = Gp - g < 16 ? Gp - g : 16;
        BLOCK_SCALES(M)
        __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, mn + g));
        for (int r = 0; r < M; r++) am[r] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(km, o->xs + r * G + g), am[r]);
        for (int j = 0; j < nb / 2; j++) {
            int gg = g + 2 * j;
            __m256i b = _mm256_loadu_si256((const __m256i *)(qn + gg * 16));
            __m512i w = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1), low);
            __m512i pi = _mm512_loadu_si512(IDX4[j]);
            for (int r = 0; r < M; r++) {
                __m512i dp = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w,
                                                 _mm512_loadu_si512(o->xp + (size_t)r * K + gg * GS));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), _mm512_permutexvar_ps(pi, ds[r]), acc[r]);
            }
        }
    }
    float tail[8] = {0};
    if (Gp < G) {                   /* an odd last group, 256 bits */
        int g = Gp;
        __m128i b = _mm_loadu_si128((const __m128i *)(qn + g * 16)), l4 = _mm_set1_epi8(15);
        __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), l4), _mm_and_si128(b, l4));
        for (int r = 0; r < M; r++)
            tail[r] = (float)sn[g] * o->d[r * G + g] * hsum8(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w,
                        _mm256_loadu_si256((const __m256i *)(o->xp + (size_t)r * K + g * GS))))
                      + (float)mn[g] * o->xs[r * G + g];
    }
    for (int r = 0; r < M; r++) y[(size_t)r * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], am[r])) + tail[r];
}

/* 8-bit row: |w| (unsigned) . (x_q with w's sign), two groups per 512 bits */
static inline __attribute__((always_inline)) void row8(const QX *o, const int M, int K, int G,
        const int8_t *q, const half *s, float *y, int N, int n) {
    __m512 acc[8], ds[8];
    const int8_t *qn = q + (size_t)n * K;
    const half *sn = s + (size_t)n * G;
    for (int r = 0; r < M; r++) acc[r] = _mm512_setzero_ps();
    int Gp = G & ~1;
    for (int g = 0; g < Gp; g += 16) {
        int nb = Gp - g < 16 ? Gp - g : 16;
        BLOCK_SCALES(M)
        for (int j = 0; j < nb / 2; j++) {
            int gg = g + 2 * j;
            __m512i w = _mm512_loadu_si512(qn + gg * GS);
            __mmask64 neg = _mm512_movepi8_mask(w);
            __m512i aw = _mm512_abs_epi8(w), pi = _mm512_loadu_si512(IDX8[j]);
            for (int r = 0; r < M; r++) {
                __m512i xv = _mm512_loadu_si512(o->xn + (size_t)r * K + gg * GS);
                xv = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);
                __m512i dp = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, xv);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), _mm512_permutexvar_ps(pi, ds[r]), acc[r]);
            }
        }
    }
    float tail[8] = {0};
    if (Gp < G) {
        int g = Gp;
        __m256i w = _mm256_loadu_si256((const __m256i *)(qn + g * GS));
        __mmask32 neg = _mm256_movepi8_mask(w);
        __m256i aw = _mm256_abs_epi8(w);
        for (int r = 0; r < M; r++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(o->xn + (size_t)r * K + g * GS));
            xv = _mm256_mask_sub_epi8(xv, neg, _mm256_setzero_si256(), xv);
            tail[r] = (float)sn[g] * o->d[r * G + g] * hsum8(_mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, xv));
        }
    }
    for (int r = 0; r < M; r++) y[(size_t)r * N + n] = _mm512_reduce_add_ps(acc[r]) + tail[r];
}
#else
/* float activations: unpack a group into two float vectors, FMA with x; the 4-bit minimum
   enters as min * sum(x of the group) */
static void quant_x(const float *x, int R, int K, QX *o) {
    int G = K / GS;
    o->xn = (int8_t *)x;            /* the rows themselves */
    for (int r = 0; r < R; r++) for (int g = 0; g < G; g++) {
        float t = 0; for (int j = 0; j < GS; j++) t += x[(size_t)r * K + g * GS + j]; o->xs[r * G + g] = t; }
}

static inline __attribute__((always_inline)) void row4(const QX *o, const int M, int K, int G,
        const uint8_t *q, const half *s, const half *m, float *y, int N, int n) {
    const float *x = (const float *)o->xn;
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
            am[r] += mg * o->xs[r * G + g];
        }
    }
    for (int r = 0; r < M; r++) y[(size_t)r * N + n] = _mm512_reduce_add_ps(acc[r]) + am[r];
}

static inline __attribute__((always_inline)) void row8(const QX *o, const int M, int K, int G,
        const int8_t *q, const half *s, float *y, int N, int n) {
    const float *x = (const float *)o->xn;
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
#endif

static inline __attribute__((always_inline)) void rowf(const float *x, const int M, int K,
        const float *w, float *y, int N, int n) {
    __m512 acc[8];
    for (int r = 0; r < M; r++) acc[r] = _mm512_setzero_ps();
    const float *wn = w + (size_t)n * K;
    for (int k = 0; k < K; k += 16) {
        __m512 wv = _mm512_loadu_ps(wn + k);
        for (int r = 0; r < M; r++) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (size_t)r * K + k), wv, acc[r]);
    }
    for (int r = 0; r < M; r++) y[(size_t)r * N + n] = _mm512_reduce_add_ps(acc[r]);
}

/* A weight: kind 4 (nibbles, scales, mins), 8 (int8, scales) or 0 (float32 in q), N x K. */
typedef struct { int kind, N, K; const void *q; const half *s; const half *m; const float *bias; } CW;

#define RSWITCH(R, BODY) switch (R) { \
    case 1: { BODY(1); break; } case 2: { BODY(2); break; } case 3: { BODY(3); break; } \
    case 4: { BODY(4); break; } case 5: { BODY(5); break; } case 6: { BODY(6); break; } \
    case 7: { BODY(7); break; } default: { BODY(8); break; } }

/* bytes of scratch mm_cols needs for inputs of K columns */
static size_t qx_bytes(int K) { return (size_t)8 * K * 2 + (size_t)8 * (K / GS) * 8 + 64; }

/* y[r, n] (row stride ldy) = x (M, K) @ W[n].T + bias[n] for n0 <= n < n1; scratch: qx_bytes(K).
   A row's sums never depend on M or on the columns' split. */
static void mm_cols(const CW *w, const float *x, int M, float *y, int ldy, int n0, int n1, void *scratch) {
    int K = w->K, G = K / GS;
    if (n0 >= n1) return;
    QX o = { (int8_t *)scratch, (int8_t *)scratch + (size_t)8 * K,
             (float *)((int8_t *)scratch + (size_t)16 * K), (float *)((int8_t *)scratch + (size_t)16 * K) + 8 * G };
    for (int r0 = 0; r0 < M; r0 += 8) {
        int R = M - r0 < 8 ? M - r0 : 8;
        const float *xr = x + (size_t)r0 * K;
        float *yr = y + (size_t)r0 * ldy;
        if (w->kind == 4) {
            quant_x(xr, R, K, &o);
            #define C4(MM) for (int n = n0; n < n1; n++) row4(&o, MM, K, G, (const uint8_t *)w->q, w->s, w->m, yr, ldy, n)
            RSWITCH(R, C4)
        } else if (w->kind == 8) {
            quant_x(xr, R, K, &o);
            #define C8(MM) for (int n = n0; n < n1; n++) row8(&o, MM, K, G, (const int8_t *)w->q, w->s, yr, ldy, n)
            RSWITCH(R, C8)
        } else {
            #define CF(MM) for (int n = n0; n < n1; n++) rowf(xr, MM, K, (const float *)w->q, yr, ldy, n)
            RSWITCH(R, CF)
        }
        if (w->bias) for (int r = 0; r < R; r++) for (int n = n0; n < n1; n++) yr[(size_t)r * ldy + n] += w->bias[n];
    }
}

static inline void span(int N, int t, int T, int *n0, int *n1) {
    *n0 = (int)((long)N * t / T); *n1 = (int)((long)N * (t + 1) / T);
}

/* y (M, N) = x (M, K) @ W.T for one packed weight; 4-bit: GGUF's nibble layout; K % 32 == 0 */
void qk_mm(int kind, const float *x, int M, int K, const void *q, const half *s, const half *m,
           int N, float *y, int nt) {
    CW w = { kind, N, K, q, s, m, 0 };
    #pragma omp parallel num_threads(nt) if(nt > 1)
    {
        int t = 0, T = 1, n0, n1;
#ifdef _OPENMP
        t = omp_get_thread_num(); T = omp_get_num_threads();
#endif
        void *scratch = malloc(qx_bytes(K));
        span(N, t, T, &n0, &n1);
        mm_cols(&w, x, M, y, N, n0, n1, scratch);
        free(scratch);
    }
}

int qk_vnni(void) {
#ifdef QK_VNNI
    return 1;
#else
    return 0;
#endif
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


def _has_vnni() -> bool:
    """AVX-512 VNNI with BW and VL: int8 dot products for the int8-activation kernels."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return all(f in flags for f in ("avx512_vnni", "avx512bw", "avx512vl", "avx512dq"))


def _compile(workdir: str) -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler")
    c, so = os.path.join(workdir, "qk.c"), os.path.join(workdir, "qk.so")
    with open(c, "w") as f:
        f.write(cstep.HEADER + SOURCE + cstep.SOURCE)
    base = [cc, "-O3", "-mavx512f", "-mfma", "-mf16c", "-shared", "-fPIC", c, "-o", so, "-lm"]
    if _has_vnni() and os.environ.get("LLMOSD_CKERNEL", "auto") != "float":
        base += ["-mavx512vnni", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-DQK_VNNI"]
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
    lib.qk_mm.argtypes = [I, P, I, I, P, P, P, I, P, I]
    lib.qk_mm.restype = None
    lib.qk_vnni.restype = I
    cstep.bind(lib)
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
        q, s = qweight.contiguous(), scales.contiguous()
        m = None if mins is None else mins.contiguous()
        self.lib.qk_mm(8 if m is None else 4, x.data_ptr(), M, K, q.data_ptr(), s.data_ptr(),
                       0 if m is None else m.data_ptr(), N, y.data_ptr(), torch.get_num_threads())
        return y

    @property
    def int8_activations(self) -> bool:
        """Whether activations are quantized to int8 per group of 32 (VNNI dot products, as
        llama.cpp does) rather than multiplied in float32."""
        return bool(self.lib.qk_vnni())


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
            got, want = k.mm(x, w["qweight"], w["scales"], w.get("mins")), x @ ref_w.t()
            tol = TOLERANCE * want.abs().max() if k.int8_activations else 1e-4
            if not torch.allclose(got, want, atol=tol, rtol=1e-4):
                raise RuntimeError(f"the C kernel disagrees with the reference ({bits} bits, {M} rows)")
