"""Hand-written AVX-512 kernels for quantized matmuls of a few rows (decode), on the CPU, and
the build of the library that holds them and the fused decode step (``cstep``).

``torch.compile``'s reduction kernel (``quant._mm_reduce``) reaches ~6 GMAC/s on one core and
each compiled call costs ~60 us of Dynamo/AOT wrappers (a decode step makes ~200 such calls).
These kernels read the packed weight once for up to 8 rows, ``mm_cols`` computing any range of
output columns (so the threads of an OpenMP region split a matmul by columns):

- float32 activations (the default): a group of 32 nibbles (or int8 values) is unpacked into
  two float vectors scaled by the group's scale and multiplied with FMAs; the 4-bit minimum
  enters as ``min * sum(x of the group)``.  Float32 rounding only.
- int8 activations (``set_int8_activations``, the daemon's ``activations = "int8"``; CPUs
  with AVX-512 VNNI): each row of x is quantized per group of 32 to int8 (llama.cpp's q8_0),
  and two groups at a time go through one ``vpdpbusd`` (unsigned nibbles or |w| times signed
  x).  ~1.7x faster; the result is exactly the float dot product of the dequantized weight
  with the quantized activations (``TOLERANCE`` bounds it against float32's).

The library is C with intrinsics, compiled with the system's C compiler (as inductor needs one
too), called through ctypes (which releases the GIL): ~3 us per call instead of ~60.  The
compiled library is kept in a private cache directory (see ``_cache_dir``), so a process
compiles it only once per machine and compiler.  Threads: OpenMP, torch's own libgomp (the
library's ``libgomp.so.1`` resolves to the one torch loaded).

``load()`` returns None where it cannot run (not x86-64 with AVX-512F, no compiler, a compile
or self-check failure, ``LLMOSD_CKERNEL=off``): callers keep the torch paths.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
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

/* int8 activations (VNNI builds, when asked): a process-wide mode, off by default */
static int qk_int8 = 0;

/* activations of up to 8 rows, quantized per group of 32 as llama.cpp's q8_0 (VNNI builds) */
typedef struct { int8_t *xn, *xp; float *d, *xs; } QX;

#ifdef QK_VNNI
/* x (R, K) -> per group: d = max|x| / 127, xn = round(x / d) in order, xp the same with each
   pair of groups interleaved by halves [g 0-15, g+1 0-15, g 16-31, g+1 16-31] (the order of
   unpacked nibble pairs), xs = d * sum of xn (the 4-bit minimum meets the same quantized x
   as the nibbles: their errors cancel as in w = nibble * scale + min). */
static void quant_x_i8(const float *x, int R, int K, QX *o) {
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
static inline __attribute__((always_inline)) void row4_i8(const QX *o, const int M, int K, int G,
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
static inline __attribute__((always_inline)) void row8_i8(const QX *o, const int M, int K, int G,
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
#endif
/* float activations: unpack a group into two float vectors, FMA with x; the 4-bit minimum
   enters as min * sum(x of the group) */
static void quant_x_f(const float *x, int R, int K, QX *o) {
    int G = K / GS;
    o->xn = (int8_t *)x;            /* the rows themselves */
    for (int r = 0; r < R; r++) for (int g = 0; g < G; g++) {
        float t = 0; for (int j = 0; j < GS; j++) t += x[(size_t)r * K + g * GS + j]; o->xs[r * G + g] = t; }
}

static inline __attribute__((always_inline)) void row4_f(const QX *o, const int M, int K, int G,
        const uint8_t *q, const half *s, const half *m, float *y, int N, int n) {
    const float *x = (const float *)o->xn;
    __m512 acc[8], acc2[8]; float am[8];      /* two chains: an FMA's latency, not its rate, bounds one row */
    for (int r = 0; r < M; r++) acc[r] = acc2[r] = _mm512_setzero_ps();
    const half *mn0 = m + (size_t)n * G;
    for (int r = 0; r < M; r++) {     /* the minimum's term, sum over g of min * sum(x), 16 groups at a time */
        __m512 a = _mm512_setzero_ps();
        int g = 0;
        for (; g + 16 <= G; g += 16)
            a = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mn0 + g))),
                                _mm512_loadu_ps(o->xs + r * G + g), a);
        float t = _mm512_reduce_add_ps(a);
        for (; g < G; g++) t += (float)mn0[g] * o->xs[r * G + g];
        am[r] = t;
    }
    const uint8_t *qn = q + (size_t)n * (K / 2);
    const half *sn = s + (size_t)n * G;
    const __m128i low = _mm_set1_epi8(15);
    for (int g = 0; g < G; g++) {
        __m512 sc = _mm512_set1_ps((float)sn[g]);
        __m128i b = _mm_loadu_si128((const __m128i *)(qn + g * 16));
        __m512 wl = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, low))), sc);
        __m512 wh = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low))), sc);
        for (int r = 0; r < M; r++) {
            const float *xr = x + (size_t)r * K + g * GS;
            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), wl, acc[r]);
            acc2[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), wh, acc2[r]);
        }
    }
    for (int r = 0; r < M; r++) y[(size_t)r * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc2[r])) + am[r];
}

static inline __attribute__((always_inline)) void row8_f(const QX *o, const int M, int K, int G,
        const int8_t *q, const half *s, float *y, int N, int n) {
    const float *x = (const float *)o->xn;
    __m512 acc[8], acc2[8];
    for (int r = 0; r < M; r++) acc[r] = acc2[r] = _mm512_setzero_ps();
    const int8_t *qn = q + (size_t)n * K;
    const half *sn = s + (size_t)n * G;
    for (int g = 0; g < G; g++) {
        __m512 sc = _mm512_set1_ps((float)sn[g]);
        __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qn + g * GS)))), sc);
        __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qn + g * GS + 16)))), sc);
        for (int r = 0; r < M; r++) {
            const float *xr = x + (size_t)r * K + g * GS;
            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, acc[r]);
            acc2[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), w1, acc2[r]);
        }
    }
    for (int r = 0; r < M; r++) y[(size_t)r * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc2[r]));
}


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
#ifdef QK_VNNI
        if (qk_int8 && w->kind == 4) {
            quant_x_i8(xr, R, K, &o);
            #define I4(MM) for (int n = n0; n < n1; n++) row4_i8(&o, MM, K, G, (const uint8_t *)w->q, w->s, w->m, yr, ldy, n)
            RSWITCH(R, I4)
        } else if (qk_int8 && w->kind == 8) {
            quant_x_i8(xr, R, K, &o);
            #define I8(MM) for (int n = n0; n < n1; n++) row8_i8(&o, MM, K, G, (const int8_t *)w->q, w->s, yr, ldy, n)
            RSWITCH(R, I8)
        } else
#endif
        if (w->kind == 4) {
            quant_x_f(xr, R, K, &o);
            #define C4(MM) for (int n = n0; n < n1; n++) row4_f(&o, MM, K, G, (const uint8_t *)w->q, w->s, w->m, yr, ldy, n)
            RSWITCH(R, C4)
        } else if (w->kind == 8) {
            quant_x_f(xr, R, K, &o);
            #define C8(MM) for (int n = n0; n < n1; n++) row8_f(&o, MM, K, G, (const int8_t *)w->q, w->s, yr, ldy, n)
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

/* bf16 of 16 floats, rounded to nearest even (finite values: weights) */
static inline __m256i to_bf16(__m512 v) {
    __m512i b = _mm512_castps_si512(v);
    b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                             _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16));
}

/* rows [0, N) of a packed weight (K columns) dequantized into out: float32, or bfloat16 when
   bf16 is set (the tiles of a many-row GEMM) */
void qk_dequant(int kind, const void *q, const half *s, const half *m, int N, int K, void *out,
                int bf16, int nt) {
    int G = K / GS;
    #pragma omp parallel for num_threads(nt) if(nt > 1 && N >= 64) schedule(static)
    for (int n = 0; n < N; n++) {
        for (int g = 0; g < G; g++) {
            __m512 sc = _mm512_set1_ps((float)s[(size_t)n * G + g]), w0, w1;
            if (kind == 4) {
                __m512 mn = _mm512_set1_ps((float)m[(size_t)n * G + g]);
                __m128i b = _mm_loadu_si128((const __m128i *)((const uint8_t *)q + (size_t)n * (K / 2) + g * 16));
                __m128i low = _mm_set1_epi8(15);
                w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, low))), sc, mn);
                w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low))), sc, mn);
            } else {
                const int8_t *qg = (const int8_t *)q + (size_t)n * K + g * GS;
                w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)qg))), sc);
                w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qg + 16)))), sc);
            }
            size_t at = (size_t)n * K + g * GS;
            if (bf16) {
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + at), to_bf16(w0));
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + at + 16), to_bf16(w1));
            } else {
                _mm512_storeu_ps((float *)out + at, w0);
                _mm512_storeu_ps((float *)out + at + 16, w1);
            }
        }
    }
}

/* int8 activations on (1) or off (0), where built with VNNI; returns the mode in force */
int qk_set_int8(int on) {
#ifdef QK_VNNI
    qk_int8 = on ? 1 : 0;
#endif
    return qk_int8;
}
"""


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo), empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def _has_avx512() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and {"avx512f", "fma", "f16c"} <= _cpu_flags()


def _has_vnni() -> bool:
    """AVX-512 VNNI with BW and VL: int8 dot products for the int8-activation kernels."""
    return {"avx512_vnni", "avx512bw", "avx512vl", "avx512dq"} <= _cpu_flags()


def _command(cc: str, c: str, so: str) -> list[str]:
    cmd = [cc, "-O3", "-mavx512f", "-mfma", "-mf16c", "-shared", "-fPIC", c, "-o", so, "-lm"]
    if _has_vnni() and os.environ.get("LLMOSD_CKERNEL", "auto") != "float":
        cmd += ["-mavx512vnni", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-DQK_VNNI"]
    return cmd


def _compile(cc: str, workdir: str) -> str:
    """Compile the library into ``workdir``; its path."""
    c, so = os.path.join(workdir, "qk.c"), os.path.join(workdir, "qk.so")
    with open(c, "w") as f:
        f.write(cstep.HEADER + SOURCE + cstep.SOURCE)
    err = ""
    for extra in (["-fopenmp"], []):                 # without OpenMP: one thread, still correct
        r = subprocess.run(_command(cc, c, so) + extra, capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            return so
        err = r.stderr[-500:]
    raise RuntimeError(f"the C compiler failed: {err}")


def _cache_dir() -> str | None:
    """Where compiled libraries are kept between processes: ``$LLMOSD_KERNEL_CACHE``, else
    ``$XDG_CACHE_HOME/llmosd`` or ``~/.cache/llmosd``; None when it is not a directory of
    this user's that only they can write (a library is code: never load one others could
    have put there), or cannot be made."""
    d = os.environ.get("LLMOSD_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "llmosd")
    if d in ("", "off"):
        return None
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        return d if _private(d, stat.S_ISDIR) else None
    except OSError:
        return None


def _private(path: str, kind) -> bool:
    st = os.lstat(path)                              # a link is never taken
    return kind(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _library(cc: str) -> ctypes.CDLL:
    """The compiled library: from the cache when an identical build is there (same source,
    flags and compiler), else compiled now (and put in the cache atomically)."""
    st = os.stat(cc)
    key = hashlib.sha256("\0".join([cstep.HEADER + SOURCE + cstep.SOURCE, *_command(cc, "", ""),
                                     os.path.realpath(cc), str(st.st_mtime_ns)]).encode()).hexdigest()[:24]
    cache = _cache_dir()
    cached = os.path.join(cache, f"qk-{key}.so") if cache else None
    if cached and os.path.lexists(cached) and _private(cached, stat.S_ISREG):
        return ctypes.CDLL(cached)
    with tempfile.TemporaryDirectory(prefix="llmosd-qk-") as d:
        so = _compile(cc, d)
        lib = ctypes.CDLL(so)                        # the mapped library outlives its file
        if cached:
            try:
                tmp = f"{cached}.{os.getpid()}.tmp"
                shutil.copyfile(so, tmp)
                os.chmod(tmp, 0o600)
                os.replace(tmp, cached)
            except OSError as e:
                log.info("could not keep the compiled kernel in %s (%s)", cache, e)
    return lib


def _open() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler")
    lib = _library(shutil.which(cc) or cc)
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.qk_mm.argtypes = [I, P, I, I, P, P, P, I, P, I]
    lib.qk_mm.restype = None
    lib.qk_dequant.argtypes = [I, P, P, P, I, I, P, I, I]
    lib.qk_dequant.restype = None
    lib.qk_set_int8.argtypes = [I]
    lib.qk_set_int8.restype = I
    cstep.bind(lib)
    return lib


class CKernel:
    """The loaded kernel: ``mm(x, qweight, scales, mins)`` = x @ W.T for float32 x (M, K)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self._int8 = False

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

    def dequant(self, qweight, scales, mins, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (N, K) in ``dtype`` (float32 or bfloat16), as ``quant.dequantize``
        computes it (w = q * scale (+ min)), without torch's compiler."""
        N, G = scales.shape
        out = torch.empty(N, G * 32, dtype=dtype)
        q, s = qweight.contiguous(), scales.contiguous()
        m = None if mins is None else mins.contiguous()
        self.lib.qk_dequant(8 if m is None else 4, q.data_ptr(), s.data_ptr(), 0 if m is None else m.data_ptr(),
                            N, G * 32, out.data_ptr(), int(dtype == torch.bfloat16), torch.get_num_threads())
        return out

    @property
    def int8_activations(self) -> bool:
        """Whether activations are quantized to int8 per group of 32 (VNNI dot products, as
        llama.cpp does) rather than multiplied in float32."""
        return self._int8

    def set_int8_activations(self, on: bool) -> bool:
        """Turn int8 activations on or off for this process (on needs AVX-512 VNNI); returns
        whether they are on."""
        self._int8 = bool(self.lib.qk_set_int8(1 if on else 0))
        return self._int8


_LOCK = threading.Lock()
_STATE: dict = {}
_WANT = {"int8": False}


def set_int8_activations(on: bool) -> None:
    """The daemon's ``activations`` setting (int8: on): int8 activations for the few-row
    quantized matmuls where the CPU has VNNI, now and for a kernel built later."""
    with _LOCK:
        _WANT["int8"] = bool(on)
        if _STATE.get("k") is not None:
            _STATE["k"].set_int8_activations(on)


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
        k = CKernel(_open())
        _self_check(k, quantize, dequantize)
        if k.set_int8_activations(True):
            _self_check(k, quantize, dequantize)
        k.set_int8_activations(_WANT["int8"])
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
