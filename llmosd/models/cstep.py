"""A whole decode step of a Llama model in one C call, on the CPU (issue 13: a fast decode step).

Eager torch spends ~9 ms of a 21 ms SmolLM2 decode step dispatching ~900 small ops (norms,
rope, gathers of the paged cache, SDPA, adds) and ~200 kernel calls, each a fork/join of the
thread pool.  Here one OpenMP parallel region runs every layer of every decoding row: the
matmuls split by output column between the threads (``qkernels``' packed int4/int8 rows, or
float32 weights), attention split by (row, head) straight over the paged pool (no gather), and
the cheap row-wise work (RMSNorm, rope, writing K/V) done by one thread between barriers.

Contract: ``Plan.build(model, kv)`` returns a plan, or None when the model has anything this
step does not do (a non-float32 activation or cache dtype, bfloat16 weights, a head_dim or
width not a multiple of 16, an active LoRA adapter is the caller's business: only the base
group may use it).  ``plan.run(ids, starts, tables)`` takes M decoding rows (one new token at
``starts[r]`` each, whose K/V go into the blocks of ``tables[r]``) and returns their logits
(M, V) float32.  Each row's arithmetic is the same whatever the other rows are (a row's sums
never depend on M), so greedy output is the same batched as alone; it differs from the eager
path at float32 rounding level (other summation orders).
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn


SOURCE = r"""
typedef struct { const float *ln1, *ln2; CW q, k, v, o, gate, up, down; } CLayer;
typedef struct {
    int L, C, H, KH, D, I, V, bs; float eps, scale;
    const float *inv_freq; const CLayer *layers; const float *lnf; CW head;
    float *kpool, *vpool; long layer_elems;
} CModel;

static void rmsnorm(const float *x, const float *w, float *y, int M, int C, float eps) {
    for (int r = 0; r < M; r++) {
        const float *xr = x + (size_t)r * C; float *yr = y + (size_t)r * C;
        float ss = 0; for (int c = 0; c < C; c++) ss += xr[c] * xr[c];
        float inv = 1.0f / sqrtf(ss / C + eps);
        for (int c = 0; c < C; c++) yr[c] = w[c] * (xr[c] * inv);
    }
}

/* rotate (n heads of D) in place at the angles of cs = [cos (D/2), sin (D/2)] */
static void rope(float *v, int n, int D, const float *cs) {
    int h2 = D / 2;
    for (int h = 0; h < n; h++) {
        float *a = v + (size_t)h * D, *b = a + h2;
        for (int i = 0; i < h2; i++) {
            float c = cs[i], s = cs[h2 + i], x0 = a[i], x1 = b[i];
            a[i] = x0 * c - x1 * s;
            b[i] = x1 * c + x0 * s;
        }
    }
}

static inline float dot16(const float *a, const float *b, int D) {
    __m512 acc = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
    return _mm512_reduce_add_ps(acc);
}

/* one head of one row over positions 0..len-1 of its block table; sc: len floats of scratch */
static void attend(const CModel *m, const float *kp, const float *vp, const float *q, int kvh,
                   const int *table, int len, float *sc, float *out) {
    int D = m->D, KH = m->KH, bs = m->bs;
    float mx = -INFINITY;
    for (int p = 0; p < len; p++) {
        long slot = (long)table[p / bs] * bs + p % bs;
        float s = dot16(q, kp + (slot * KH + kvh) * D, D) * m->scale;
        sc[p] = s; if (s > mx) mx = s;
    }
    float sum = 0;
    for (int p = 0; p < len; p++) { sc[p] = expf(sc[p] - mx); sum += sc[p]; }
    float inv = 1.0f / sum;
    for (int d = 0; d < D; d++) out[d] = 0;
    for (int p = 0; p < len; p++) {
        long slot = (long)table[p / bs] * bs + p % bs;
        const float *vr = vp + (slot * KH + kvh) * D;
        __m512 w = _mm512_set1_ps(sc[p] * inv);
        for (int d = 0; d < D; d += 16)
            _mm512_storeu_ps(out + d, _mm512_fmadd_ps(w, _mm512_loadu_ps(vr + d), _mm512_loadu_ps(out + d)));
    }
}

/* the part [a, b) of the concatenated columns [0, off + w->N) that falls in w's own [off, off + N) */
static void mm_part(const CW *w, int off, const float *x, int M, float *y, int a, int b, void *scratch) {
    int n0 = a > off ? a - off : 0, n1 = b - off < w->N ? b - off : w->N;
    mm_cols(w, x, M, y, w->N, n0, n1, scratch);
}

/* x (M, C): the rows' embeddings, in place -> final hidden; logits (M, V).  pos (M): each row's
   position; tables (M, nb): its block table; buf: M * (2C + 2HD + 2KD + 2I) + M * D floats;
   sc: nt * maxlen floats. */
void cs_step(const CModel *m, int M, float *x, const int *pos, const int *tables, int nb,
             float *logits, float *buf, float *sc, int maxlen, int nt) {
    int C = m->C, H = m->H, KH = m->KH, D = m->D, I = m->I, HD = H * D, KD = KH * D;
    float *h = buf, *t = h + (size_t)M * C, *q = t + (size_t)M * C, *att = q + (size_t)M * HD;
    float *k = att + (size_t)M * HD, *v = k + (size_t)M * KD, *g = v + (size_t)M * KD;
    float *u = g + (size_t)M * I, *cs = u + (size_t)M * I;
    for (int r = 0; r < M; r++) for (int i = 0; i < D / 2; i++) {
        float f = (float)pos[r] * m->inv_freq[i];
        cs[(size_t)r * D + i] = cosf(f); cs[(size_t)r * D + D / 2 + i] = sinf(f);
    }
    #pragma omp parallel num_threads(nt) if(nt > 1)
    {
        int tid = 0, T = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num(); T = omp_get_num_threads();
#endif
        int n0, n1, mk = C > HD ? C : HD;
        void *scr = malloc(qx_bytes(mk > I ? mk : I));
        for (int l = 0; l < m->L; l++) {
            const CLayer *ly = m->layers + l;
            float *kp = m->kpool + l * m->layer_elems, *vp = m->vpool + l * m->layer_elems;
            #pragma omp single
            rmsnorm(x, ly->ln1, h, M, C, m->eps);
            span(HD + 2 * KD, tid, T, &n0, &n1);
            mm_part(&ly->q, 0, h, M, q, n0, n1, scr);
            mm_part(&ly->k, HD, h, M, k, n0, n1, scr);
            mm_part(&ly->v, HD + KD, h, M, v, n0, n1, scr);
            #pragma omp barrier
            #pragma omp single
            for (int r = 0; r < M; r++) {
                rope(q + (size_t)r * HD, H, D, cs + (size_t)r * D);
                rope(k + (size_t)r * KD, KH, D, cs + (size_t)r * D);
                int p = pos[r];
                long slot = (long)tables[(size_t)r * nb + p / m->bs] * m->bs + p % m->bs;
                memcpy(kp + slot * KD, k + (size_t)r * KD, sizeof(float) * KD);
                memcpy(vp + slot * KD, v + (size_t)r * KD, sizeof(float) * KD);
            }
            for (int j = tid; j < M * H; j += T) {
                int r = j / H, hh = j % H;
                attend(m, kp, vp, q + (size_t)r * HD + hh * D, hh / (H / KH), tables + (size_t)r * nb,
                       pos[r] + 1, sc + (size_t)tid * maxlen, att + (size_t)r * HD + hh * D);
            }
            #pragma omp barrier
            span(C, tid, T, &n0, &n1);
            mm_cols(&ly->o, att, M, t, C, n0, n1, scr);
            for (int r = 0; r < M; r++) for (int n = n0; n < n1; n++) x[(size_t)r * C + n] += t[(size_t)r * C + n];
            #pragma omp barrier
            #pragma omp single
            rmsnorm(x, ly->ln2, h, M, C, m->eps);
            span(I, tid, T, &n0, &n1);
            mm_cols(&ly->gate, h, M, g, I, n0, n1, scr);
            mm_cols(&ly->up, h, M, u, I, n0, n1, scr);
            for (int r = 0; r < M; r++) for (int n = n0; n < n1; n++) {
                float a = g[(size_t)r * I + n];
                g[(size_t)r * I + n] = a / (1.0f + expf(-a)) * u[(size_t)r * I + n];
            }
            #pragma omp barrier
            span(C, tid, T, &n0, &n1);
            mm_cols(&ly->down, g, M, t, C, n0, n1, scr);
            for (int r = 0; r < M; r++) for (int n = n0; n < n1; n++) x[(size_t)r * C + n] += t[(size_t)r * C + n];
            #pragma omp barrier
        }
        #pragma omp single
        rmsnorm(x, m->lnf, h, M, C, m->eps);
        span(m->V, tid, T, &n0, &n1);
        mm_cols(&m->head, h, M, logits, m->V, n0, n1, scr);
        free(scr);
    }
}
"""

HEADER = "#include <math.h>\n#include <string.h>\n"


class CW(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int),
                ("q", ctypes.c_void_p), ("s", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("bias", ctypes.c_void_p)]


class CLayer(ctypes.Structure):
    _fields_ = [("ln1", ctypes.c_void_p), ("ln2", ctypes.c_void_p)] + [
        (n, CW) for n in ("q", "k", "v", "o", "gate", "up", "down")]


class CModel(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("L", "C", "H", "KH", "D", "I", "V", "bs")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("inv_freq", ctypes.c_void_p),
        ("layers", ctypes.POINTER(CLayer)), ("lnf", ctypes.c_void_p), ("head", CW),
        ("kpool", ctypes.c_void_p), ("vpool", ctypes.c_void_p), ("layer_elems", ctypes.c_long)]


def bind(lib: ctypes.CDLL) -> None:
    """Declare ``cs_step``'s signature on the compiled library."""
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.cs_step.argtypes = [ctypes.POINTER(CModel), I, P, P, P, I, P, P, P, I, I]
    lib.cs_step.restype = None


def _f32(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu" \
        and t.is_contiguous()


def _weight(mod, keep: list) -> CW | None:
    """The C view of a linear layer: float32 (``nn.Linear``), or packed int4/int8 with float16
    group scales (``quant.QLinear``, known by its buffers); a LoRA wrapper (``lora.LoraLinear``)
    stands for its base, as the base group runs without adapters.  None: some other form."""
    base = getattr(mod, "qbase", None)
    if base is not None:
        mod = base
    bias = getattr(mod, "bias", None)
    if bias is not None and not _f32(bias):
        return None
    if hasattr(mod, "qweight"):
        q, s, m = mod.qweight, mod.scales, mod.mins
        if s.dtype != torch.float16 or mod.dtype != torch.float32 or q.device.type != "cpu" \
                or not all(t is None or t.is_contiguous() for t in (q, s, m)) or mod.in_features % 32:
            return None
        keep += [q, s, m, bias]
        return CW(mod.bits, mod.out_features, mod.in_features, q.data_ptr(), s.data_ptr(),
                  0 if m is None else m.data_ptr(), 0 if bias is None else bias.data_ptr())
    if isinstance(mod, nn.Linear) and _f32(mod.weight) and mod.in_features % 16 == 0:
        keep += [mod.weight, bias]
        return CW(0, mod.out_features, mod.in_features, mod.weight.data_ptr(), 0, 0,
                  0 if bias is None else bias.data_ptr())
    return None


class Plan:
    """The C description of one model and its KV pool (pointers into their tensors, which it
    keeps alive); rebuilt when either changes (adapters installed, the pool reallocated)."""

    def __init__(self, lib, model, kv, cm: CModel, layers, keep: list):
        self.lib, self.model, self.kv, self.cm, self.layers, self.keep = lib, model, kv, cm, layers, keep

    @classmethod
    def build(cls, lib, model, kv) -> "Plan | None":
        c = model.config
        emb = model.model.embed_tokens
        emb_dtype = emb.dtype if hasattr(emb, "qweight") else emb.weight.dtype
        if kv is None or not _f32(kv.k) or emb_dtype != torch.float32:
            return None
        D, C = c.head_dim, c.hidden_size
        if D % 16 or C % 16 or c.num_attention_heads % c.num_key_value_heads or D > 1024:
            return None
        keep: list = []
        norms = [model.model.norm.weight]
        layers = (CLayer * c.num_hidden_layers)()
        for i, blk in enumerate(model.model.layers):
            a, f = blk.self_attn, blk.mlp
            ws = [_weight(mod, keep) for mod in (a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                                                  f.gate_proj, f.up_proj, f.down_proj)]
            lns = [blk.input_layernorm.weight, blk.post_attention_layernorm.weight]
            if any(w is None for w in ws) or not all(_f32(t) for t in lns):
                return None
            norms += lns
            layers[i] = CLayer(lns[0].data_ptr(), lns[1].data_ptr(), *ws)
        head = _weight(model.lm_head, keep)
        if head is None or not all(_f32(t) for t in norms) or not _f32(model.inv_freq):
            return None
        keep += norms + [model.inv_freq, kv.k, kv.v]
        cm = CModel(c.num_hidden_layers, C, c.num_attention_heads, c.num_key_value_heads, D,
                    c.intermediate_size, head.N, kv.block_size, c.rms_norm_eps, D ** -0.5,
                    model.inv_freq.data_ptr(), layers, model.model.norm.weight.data_ptr(), head,
                    kv.k.data_ptr(), kv.v.data_ptr(), kv.k[0].numel())
        return cls(lib, model, kv, cm, layers, keep)

    def run(self, ids: list[int], starts: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Logits (M, V) float32 of M decoding rows (see the module's contract)."""
        c, M = self.cm, len(ids)
        x = self.model.model.embed_tokens(torch.tensor(ids, dtype=torch.long))     # (M, C)
        x = x.to(torch.float32).contiguous()
        nb = max(len(t) for t in tables)
        tab = torch.tensor([list(t) + [0] * (nb - len(t)) for t in tables], dtype=torch.int32)
        pos = torch.tensor(starts, dtype=torch.int32)
        logits = torch.empty(M, c.V)
        buf = torch.empty(M * (2 * c.C + 2 * c.H * c.D + 2 * c.KH * c.D + 2 * c.I + c.D))
        nt = torch.get_num_threads()
        maxlen = max(starts) + 1
        sc = torch.empty(nt * maxlen)
        self.lib.cs_step(ctypes.byref(c), M, x.data_ptr(), pos.data_ptr(), tab.data_ptr(), nb,
                         logits.data_ptr(), buf.data_ptr(), sc.data_ptr(), maxlen, nt)
        return logits

