"""Weight-only quantized layers: int8 and int4 weights in groups of 32 along the input dimension.

Stored form (safetensors, beside float tensors): a quantized linear ``X`` is ``X.qweight``
(int8 (N, K) for 8 bits; uint8 (N, K/2) for 4 bits in GGUF's nibble layout: in each group of
32, byte j holds element j in its low nibble and element j+16 in its high one), ``X.scales``
(float16 (N, K/32)) and, for 4 bits only, ``X.mins`` (float16 (N, K/32)).  The weight is
``q * scale`` (8 bits, q signed) or ``q * scale + min`` (4 bits, q in 0..15; GGUF's Q4_0 is the
case min = -8 * scale), so Q8_0, Q4_0 and Q4_1 blocks are kept bit for bit.

``QLinear`` and ``QEmbedding`` replace ``nn.Linear``/``nn.Embedding`` after a model is built
(``quantize_model`` or ``install``); a tied lm_head shares the embedding's q tensors.  The
matmul kernel for a few rows (decode) is a reduction over the packed weight compiled with
``torch.compile`` once per process when that works (decided once, logged: ``kernel_mode``),
or on x86-64 CPUs with AVX-512 the C kernel of ``models.qkernels`` (faster, and without Dynamo's
per-call cost); more rows (prefill), gradients or no compiler: dequantize + GEMM a tile at a time,
4-bit ones with float32 x in bfloat16 on CPUs that multiply it natively (AVX512-BF16, AMX; float32
sums, ~2x faster; bf16 rounding is small beside 4-bit error only) unless ``LLMOSD_PREFILL_BF16=off``.
"""
from __future__ import annotations

import logging
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32
SMALL_M = 4                       # rows up to which the reduction kernel beats dequant + GEMM
CK_ROWS = 16                      # rows up to which the C kernel beats dequant + GEMM (CPU)
BF16_ROWS = 64                    # rows from which float32 x, 4-bit W take bf16 GEMMs (gain <= 1.2x below)
QSUFFIXES = (".qweight", ".scales", ".mins")
log = logging.getLogger("llmosd.quant")


# ---- pure tensor functions -------------------------------------------------------------------

def quantize8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 q (N, K), float16 scales (N, K/32)): symmetric absmax per group,
    as GGUF's Q8_0 (scale = absmax / 127, q = round(w / scale))."""
    N, K = w.shape
    g = w.float().reshape(N, K // GROUP, GROUP)
    s = (g.abs().amax(-1) / 127).to(torch.float16)
    inv = torch.where(s.float() > 0, 1 / s.float(), torch.zeros_like(s, dtype=torch.float32))
    q = torch.round(g * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(N, K), s


def quantize4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> (packed uint8 (N, K/2), float16 scales, float16 mins): asymmetric min/max
    per group of 32, as GGUF's Q4_1 (w ~ q * scale + min, q in 0..15)."""
    N, K = w.shape
    g = w.float().reshape(N, K // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15).to(torch.float16)
    m = lo.to(torch.float16)
    sf = s.float()
    inv = torch.where(sf > 0, 1 / sf, torch.zeros_like(sf))
    q = torch.round((g - m.float()[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    return pack4(q.reshape(N, K)), s, m


def pack4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 values 0..15 -> (N, K/2) bytes in GGUF's layout (per group of 32: byte j =
    element j | element j+16 << 4)."""
    N, K = q.shape
    g = q.reshape(N, K // GROUP, 2, GROUP // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(N, K // 2)


def unpack4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack4``: (N, K/2) bytes -> (N, K) uint8 values 0..15."""
    N, H = p.shape
    g = p.reshape(N, H // (GROUP // 2), GROUP // 2)
    return torch.cat([g & 15, g >> 4], -1).reshape(N, 2 * H)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) float weight a stored (qweight, scales[, mins]) triple describes."""
    N = qweight.shape[0]
    G = scales.shape[1]
    if mins is None:
        q = qweight.reshape(N, G, GROUP).float()
        w = q * scales.float()[..., None]
    else:
        q = torch.cat([(p := qweight.reshape(N, G, GROUP // 2)) & 15, p >> 4], -1).float()
        w = q * scales.float()[..., None] + mins.float()[..., None]
    return w.reshape(N, G * GROUP).to(dtype)


def quantize(w: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """{"qweight", "scales"[, "mins"]} of ``w`` at ``bits`` (8 or 4)."""
    return dict(zip(("qweight", "scales", "mins"), quantize8(w) if bits == 8 else quantize4(w)))


def quantizable(shape) -> bool:
    """Whether a weight of ``shape`` can take the group-32 forms (2-D, K a multiple of 32)."""
    return len(shape) == 2 and shape[1] % GROUP == 0 and shape[1] > 0


# ---- kernels ---------------------------------------------------------------------------------

def _mm_reduce8(x, qweight, scales, mins=None) -> torch.Tensor:
    """``_mm_reduce`` for 8 bits (its own function: torch.compile caches per code object)."""
    return _mm_reduce(x, qweight, scales, None)


def _mm_reduce4(x, qweight, scales, mins) -> torch.Tensor:
    """``_mm_reduce`` for 4 bits."""
    return _mm_reduce(x, qweight, scales, mins)


def _mm_reduce(x: torch.Tensor, qweight, scales, mins) -> torch.Tensor:
    """x (M, K) -> (M, N) = x @ W.T for a packed W, written as one broadcast multiply and
    reduction that inductor fuses into a single vectorized loop over the packed bytes (the
    float weight is never materialised: for a few rows this reads 1/4 or 1/8 of the bytes a
    float32 GEMM reads).  4 bits: the low nibbles meet elements 0..15 of each group of x, the
    high ones elements 16..31 (GGUF's layout), so no interleaving is needed."""
    M, K = x.shape
    N, G = scales.shape
    s = scales.to(x.dtype)[..., None]
    if mins is None:
        w = (qweight.reshape(N, G, GROUP).to(x.dtype) * s).reshape(N, K)
        return (x[:, None, :] * w[None]).sum(-1)
    xg = x.reshape(M, 1, G, GROUP)
    p = qweight.reshape(1, N, G, GROUP // 2)
    m = mins.to(x.dtype)[None, ..., None]
    lo = (p & 15).to(x.dtype) * s[None] + m
    hi = (p >> 4).to(x.dtype) * s[None] + m
    return (xg[..., :GROUP // 2] * lo).sum((-1, -2)) + (xg[..., GROUP // 2:] * hi).sum((-1, -2))


def _dequant(qweight, scales, mins) -> torch.Tensor:
    """``dequantize`` to float32 as one function for torch.compile: a single fused loop over
    the packed bytes instead of eager's five passes over a float copy."""
    return dequantize(qweight, scales, mins, torch.float32)


def _dequant_bf16(qweight, scales, mins) -> torch.Tensor:
    """``_dequant`` to bfloat16 (computed in float32, rounded once)."""
    return dequantize(qweight, scales, mins, torch.bfloat16)


TILE = 1 << 20                    # weight elements dequantized at a time for a GEMM (4 MiB f32)


def _mm_tiled(x: torch.Tensor, qweight, scales, mins, deq, cdt: torch.dtype | None = None) -> torch.Tensor:
    """x (M, K) @ W.T for many rows: W dequantized (``deq``, to ``cdt``, default x's dtype) a tile
    of output rows at a time, each multiplied by MKL's (bfloat16: oneDNN's) GEMM while in cache.
    Tiles are small enough for the allocator to reuse (a whole 49152 x 576 head in float32 would
    be fresh pages each call).  ``cdt`` not x's dtype: x is rounded to it once, the GEMM sums in
    float32 and the output, rounded to ``cdt``, comes back in x's dtype."""
    N, G = scales.shape
    rows, cdt = max(1, TILE // (G * GROUP)), cdt or x.dtype
    xc, out = x.to(cdt), x.new_empty(x.shape[0], N, dtype=cdt)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        w = deq(qweight[n0:n1], scales[n0:n1], None if mins is None else mins[n0:n1])
        torch.matmul(xc, w.to(cdt).t(), out=out[:, n0:n1])
    return out.to(x.dtype)


class _Kernels:
    """The kernel functions of this process, compiled once when torch.compile works."""

    def __init__(self):
        self.lock = threading.Lock()
        self.mode: str | None = None          # "compiled" | "eager"
        self.reduce8, self.reduce4 = _mm_reduce, _mm_reduce
        self.dequant, self.dequant_bf16 = _dequant, _dequant_bf16
        self.ck = None                        # qkernels.CKernel where it runs
        self.wanted = os.environ.get("LLMOSD_COMPILE", "auto")
        # float32 prefill GEMMs in bfloat16 only where the CPU multiplies it natively (else emulated)
        cap = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", dict)()
        self.bf16 = os.environ.get("LLMOSD_PREFILL_BF16", "auto") != "off" \
            and bool(cap.get("avx512_bf16") or cap.get("amx_bf16"))

    def ensure(self) -> str:
        with self.lock:
            if self.mode is None:
                if self.wanted != "off":
                    from llmosd.models import qkernels
                    self.ck = qkernels.load(quantize, dequantize)
                if self.wanted == "off":
                    self.mode = "eager"
                elif self.ck is not None and not torch.cuda.is_available():
                    # the C kernels serve every CPU path: torch's compiler (~165 MiB of RSS
                    # and seconds per process) is never imported
                    ck = self.ck
                    self.dequant = lambda q, s, m: ck.dequant(q, s, m, torch.float32)
                    self.dequant_bf16 = lambda q, s, m: ck.dequant(q, s, m, torch.bfloat16)
                    self.mode = "compiled"
                else:
                    self.mode = self._try_compile()
                log.info("quantized kernels: %s%s%s", self.mode,
                         f"; C kernel (AVX-512) for up to {CK_ROWS} rows" if self.ck else "",
                         "; bfloat16 prefill GEMMs on the CPU" if self.bf16 else "")
            return self.mode

    def _try_compile(self) -> str:
        try:
            # dynamic shapes: one compile serves every layer's (N, K) (a static kernel per
            # shape; one function per bit width: no guard flips between them).  Warmed up in
            # inference mode, as the engine runs (a change of grad mode recompiles).
            r8, r4 = torch.compile(_mm_reduce8, dynamic=True), torch.compile(_mm_reduce4, dynamic=True)
            dq = torch.compile(_dequant, dynamic=True)
            dqb = torch.compile(_dequant_bf16, dynamic=True)
            for bits, fn in ((8, r8), (4, r4)):
                w = {k: _own(v) for k, v in quantize(torch.randn(96, 20 * GROUP), bits).items()}
                with torch.inference_mode():
                    x = torch.randn(1, 20 * GROUP)
                    y = fn(x, w["qweight"], w["scales"], w.get("mins"))
                    want = dequantize(w["qweight"], w["scales"], w.get("mins"))
                    if not torch.allclose(y, F.linear(x, want), atol=1e-3, rtol=1e-3):
                        raise RuntimeError("the compiled kernel disagrees with the reference")
                    # tiles are row slices (views of the same storage): warm that form up too
                    for part in (w, {k: v[:48] for k, v in w.items()}):
                        got, gotb = (f(part["qweight"], part["scales"], part.get("mins")) for f in (dq, dqb))
                        if not (torch.equal(got, want[:len(got)]) and torch.equal(gotb, got.bfloat16())):
                            raise RuntimeError("the compiled dequantization disagrees with the reference")
        except Exception as e:       # no C++ compiler, an inductor bug: eager is correct, slower
            (log.warning if self.wanted == "on" else log.info)(
                "torch.compile of the quantized kernels failed (%s); using eager", e)
            return "eager"
        self.reduce8, self.reduce4, self.dequant, self.dequant_bf16 = r8, r4, dq, dqb
        return "compiled"


KERNELS = _Kernels()


def set_compile(mode: str) -> None:
    """The daemon's ``compile`` setting (auto|on|off); takes effect before the first kernel use."""
    with KERNELS.lock:
        if KERNELS.mode is None:
            KERNELS.wanted = mode


_EXACT = threading.local()


class float32_gemms:
    """Within it (this thread), many-row GEMMs stay float32: evaluations (score, embed,
    classify) give the float32 path's figures, as transformers computes them."""

    def __enter__(self):
        self.prev, _EXACT.on = getattr(_EXACT, "on", False), True

    def __exit__(self, *exc):
        _EXACT.on = self.prev


def kernel_mode() -> str:
    """"compiled" (the C kernels of ``qkernels``, or torch.compile'd ones) or "eager": decided
    (and the compile tried) once per process."""
    return KERNELS.ensure()


def qmatmul(x: torch.Tensor, qweight, scales, mins, bias=None) -> torch.Tensor:
    """x (..., K) @ W.T (+ bias) for a quantized W; x's dtype is the compute dtype."""
    shape, x2 = x.shape, x.reshape(-1, x.shape[-1])
    mode, ck, M = KERNELS.mode or KERNELS.ensure(), KERNELS.ck, x2.shape[0]
    if torch.is_grad_enabled():
        y = F.linear(x2, dequantize(qweight, scales, mins, x.dtype), bias)
        return y.reshape(*shape[:-1], y.shape[-1])
    if ck is not None and M <= CK_ROWS and ck.fits(x2, scales):
        y = ck.mm(x2, qweight, scales, mins)
    elif mode == "compiled" and M <= SMALL_M:
        x2 = x2.clone() if x2._base is not None else x2    # a few rows: views recompile (guards)
        y = (KERNELS.reduce8 if mins is None else KERNELS.reduce4)(x2, qweight, scales, mins)
    else:       # bfloat16 GEMMs: a bfloat16 model, or float32 4-bit prefill where the CPU runs bf16 natively
        bf = x2.dtype == torch.bfloat16 or (KERNELS.bf16 and mins is not None and M >= BF16_ROWS
                                            and not getattr(_EXACT, "on", False)
                                            and x2.dtype == torch.float32 and not x2.is_cuda)
        y = _mm_tiled(x2, qweight, scales, mins, KERNELS.dequant_bf16 if bf else KERNELS.dequant,
                      torch.bfloat16 if bf else x2.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], y.shape[-1])


# ---- modules ---------------------------------------------------------------------------------

def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as a tensor that is not a view: compiled kernels guard on a view's base, so views
    of different bases would recompile (the loader's memory-mapped tensors are not views)."""
    return t.clone() if t is not None and t._base is not None else t


class _Packed(nn.Module):
    """A quantized layer's q tensors (buffers), bit width, compute (activation) dtype and kind."""

    def __init__(self, qweight, scales, mins, dtype: torch.dtype, kind: str):
        super().__init__()
        self.bits = 8 if mins is None else 4
        for name, t in (("qweight", qweight), ("scales", scales), ("mins", mins)):
            self.register_buffer(name, _own(t))
        self.dtype, self.kind = dtype, kind or f"int{self.bits}"

    @property
    def device(self) -> torch.device:
        return self.qweight.device


class QLinear(_Packed):
    """A linear layer whose weight is int8 or int4 (group 32); inference only (no gradients)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32, kind: str = ""):
        super().__init__(qweight, scales, mins, dtype, kind)
        self.out_features, self.in_features = scales.shape[0], scales.shape[1] * GROUP
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qmatmul(x.to(self.dtype), self.qweight, self.scales, self.mins, self.bias)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.mins, dtype or self.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


class QEmbedding(_Packed):
    """An embedding table kept quantized: a lookup gathers the rows and dequantizes them."""

    def __init__(self, qweight, scales, mins, dtype: torch.dtype = torch.float32, kind: str = ""):
        super().__init__(qweight, scales, mins, dtype, kind)
        self.num_embeddings, self.embedding_dim = scales.shape[0], scales.shape[1] * GROUP

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor of the compute dtype on the table's device: code that only asks the
        embedding's ``weight.dtype``/``.device`` keeps working (the table itself is packed)."""
        return self.scales.new_empty(0, dtype=self.dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        m = None if self.mins is None else self.mins[flat]
        rows = dequantize(self.qweight[flat], self.scales[flat], m, self.dtype)
        return rows.reshape(*tokens.shape, self.embedding_dim)

    def tied_head(self) -> QLinear:
        """The lm_head that shares this table's q tensors (no copy)."""
        return QLinear(self.qweight, self.scales, self.mins, None, self.dtype, self.kind)


# ---- models ----------------------------------------------------------------------------------

def _children(model: nn.Module):
    for path, mod in model.named_modules():
        for attr, child in mod.named_children():
            yield (f"{path}.{attr}" if path else attr), mod, attr, child


def quantize_model(model: nn.Module, bits: int) -> nn.Module:
    """Replace every float nn.Linear / nn.Embedding whose input size is a multiple of 32 by its
    quantized form at ``bits``, in place (a tied lm_head shares the embedding's tensors)."""
    emb = model.model.embed_tokens
    tied = getattr(model, "lm_head", None) is not None and isinstance(emb, nn.Embedding) \
        and model.lm_head.weight is emb.weight
    with torch.no_grad():
        for path, parent, attr, child in list(_children(model)):
            if type(child) is nn.Linear and quantizable(child.weight.shape) and not (tied and attr == "lm_head"):
                t = quantize(child.weight, bits)
                setattr(parent, attr, QLinear(t["qweight"], t["scales"], t.get("mins"), child.bias,
                                              child.weight.dtype))
            elif type(child) is nn.Embedding and quantizable(child.weight.shape):
                t = quantize(child.weight, bits)
                q = QEmbedding(t["qweight"], t["scales"], t.get("mins"), child.weight.dtype)
                setattr(parent, attr, q)
                if tied and child is emb:
                    model.lm_head = q.tied_head()
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every QLinear/QEmbedding by a float nn.Linear/nn.Embedding, in place (a tied
    lm_head shares the embedding's float weight again)."""
    emb = model.model.embed_tokens
    tied = isinstance(emb, QEmbedding) and isinstance(getattr(model, "lm_head", None), QLinear) \
        and model.lm_head.qweight is emb.qweight
    with torch.no_grad():
        for path, parent, attr, child in list(_children(model)):
            if isinstance(child, QLinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device="meta")
                lin.weight = nn.Parameter(child.dequantized(dtype), requires_grad=False)
                if child.bias is not None:
                    lin.bias = nn.Parameter(child.bias.to(dtype), requires_grad=False)
                setattr(parent, attr, lin)
            elif isinstance(child, QEmbedding):
                e = nn.Embedding(child.num_embeddings, child.embedding_dim, device="meta")
                e.weight = nn.Parameter(dequantize(child.qweight, child.scales, child.mins, dtype),
                                        requires_grad=False)
                setattr(parent, attr, e)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def stored_groups(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Layer path -> {"qweight", "scales"[, "mins"]} of the quantized layers among stored
    ``tensors``; ValueError for an incomplete or inconsistent triple."""
    out = {}
    for name in tensors:
        if name.endswith(".qweight"):
            path = name[:-len(".qweight")]
            if path + ".scales" not in tensors:
                raise ValueError(f"tensor {path}.scales is missing beside {name}")
            g = {"qweight": tensors[name], "scales": tensors[path + ".scales"]}
            if path + ".mins" in tensors:
                g["mins"] = tensors[path + ".mins"]
            group_shape(g, path)
            out[path] = g
    return out


def group_shape(g: dict, path: str = "a quantized layer") -> tuple[int, int]:
    """(N, K) of the float weight a stored group stands for; ValueError when the parts disagree."""
    q, s, m = g["qweight"], g["scales"], g.get("mins")
    if s.ndim != 2 or q.ndim != 2:
        raise ValueError(f"{path}: qweight and scales must be 2-D")
    N, K = s.shape[0], s.shape[1] * GROUP
    want = (N, K) if m is None else (N, K // 2)
    wdt = torch.int8 if m is None else torch.uint8
    if tuple(q.shape) != want or q.dtype != wdt or (m is not None and m.shape != s.shape):
        raise ValueError(f"{path}: qweight {tuple(q.shape)} {q.dtype} does not fit scales {tuple(s.shape)}")
    return N, K


def stored_kind(g: dict) -> str:
    """The GGUF block format a stored group equals: q8_0, q4_0 (min = -8 * scale) or q4_1."""
    if "mins" not in g:
        return "q8_0"
    return "q4_0" if torch.equal(g["mins"], g["scales"] * -8) else "q4_1"


def target_bits(quant: str, stored: int | None, embedding_or_head: bool, shape) -> int | None:
    """Bits a layer gets under ``quant`` (None: float).  "auto" keeps the stored form; int4 puts
    the embedding and lm_head at 8 bits (as llama.cpp's 4-bit files do: they set the accuracy)."""
    if quant == "auto":
        return stored
    if quant == "none" or not quantizable(shape):
        return None
    return 8 if quant == "int8" or embedding_or_head else 4


def install(model: nn.Module, tensors: dict, groups: dict, device: torch.device,
            dtype: torch.dtype, quant: str) -> None:
    """Fill a model built on the meta device with ``tensors`` (HF names) and ``groups`` (its
    stored quantized layers), each linear/embedding in the form ``target_bits`` gives, on
    ``device``; tensors already in place (CPU, same dtype) are used without a copy."""
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for path, parent, attr, child in list(_children(model)):
            if tied and path == "lm_head":
                continue
            if isinstance(child, (nn.Linear, nn.Embedding)):
                setattr(parent, attr, _layer(path, child, tensors, groups.get(path), device, dtype, quant))
            elif not isinstance(child, (QLinear, QEmbedding)):
                for pname, _ in list(child.named_parameters(recurse=False)):
                    t = tensors[f"{path}.{pname}"].to(device, dtype)
                    setattr(child, pname, nn.Parameter(t, requires_grad=False))
        if tied:
            emb = model.model.embed_tokens
            if isinstance(emb, QEmbedding):
                model.lm_head = emb.tied_head()
            else:
                model.lm_head.weight = emb.weight


def _layer(path, child, tensors, g, device, dtype, quant) -> nn.Module:
    is_emb = isinstance(child, nn.Embedding)
    stored = None if g is None else (8 if "mins" not in g else 4)
    shape = group_shape(g, path) if g is not None else tuple(tensors[path + ".weight"].shape)
    bits = target_bits(quant, stored, is_emb or path == "lm_head", shape)
    bias = tensors.get(path + ".bias")
    bias = None if bias is None else bias.to(device, dtype)
    if bits is not None and bits == stored:
        parts = [g["qweight"].to(device), g["scales"].to(device), g.get("mins")]
        parts[2] = None if parts[2] is None else parts[2].to(device)
        kind = stored_kind(g)
    else:
        w = (dequantize(g["qweight"], g["scales"], g.get("mins"), dtype) if g is not None
             else tensors[path + ".weight"])
        if bits is None:
            w = nn.Parameter(w.to(device, dtype), requires_grad=False)
            if is_emb:
                e = nn.Embedding(*shape, device="meta")
                e.weight = w
                return e
            lin = nn.Linear(shape[1], shape[0], bias=bias is not None, device="meta")
            lin.weight = w
            if bias is not None:
                lin.bias = nn.Parameter(bias, requires_grad=False)
            return lin
        t = quantize(w.to(device), bits)
        parts, kind = [t["qweight"], t["scales"], t.get("mins")], f"int{bits}"
    if is_emb:
        return QEmbedding(*parts, dtype=dtype, kind=kind)
    return QLinear(*parts, bias=bias, dtype=dtype, kind=kind)


def quantize_state_dict(sd: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """HF-named float tensors with every 2-D weight (linears, the embedding, lm_head) whose input
    size is a multiple of 32 replaced by its stored quantized form at ``bits`` (the embedding
    and lm_head at 8 bits: see ``target_bits``); norms and biases stay as they are."""
    out = {}
    for name, t in sd.items():
        path = name[:-len(".weight")]
        head = path in ("model.embed_tokens", "lm_head")
        if name.endswith(".weight") and t.is_floating_point() and quantizable(t.shape) \
                and not path.endswith("norm"):
            for part, v in quantize(t, 8 if head else bits).items():
                out[f"{path}.{part}"] = v
        else:
            out[name] = t
    return out


def parameter_count(sd: dict[str, torch.Tensor]) -> int:
    """Parameters the stored tensors stand for (a quantized layer counts its N*K weights)."""
    groups = stored_groups(sd)
    n = sum(t.numel() for k, t in sd.items() if not k.endswith(QSUFFIXES))
    return n + sum(a * b for a, b in (group_shape(g) for g in groups.values()))


def stored_summary(sd: dict[str, torch.Tensor]) -> str:
    """The manifest's ``weights.quant``: the stored kinds, 4-bit first ("q4_1+q8_0"); "" if none."""
    kinds = {stored_kind(g) for g in stored_groups(sd).values()}
    return "+".join(sorted(kinds, key=lambda k: (-int("4" in k), k)))


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QLinear, QEmbedding)) for m in model.modules())


def describe(model: nn.Module) -> str:
    """What the weights of a loaded model are, for the model table: the quantized kinds (e.g.
    "q4_1+q8_0", "int8") or the float dtype ("float32"); " (eager)" when quantized kernels run
    uncompiled."""
    kinds = sorted({m.kind for m in model.modules() if isinstance(m, (QLinear, QEmbedding))},
                   key=lambda k: (-int("4" in k), k))
    if not kinds:
        p = next(model.parameters(), None)
        return str(p.dtype).replace("torch.", "") if p is not None else "float32"
    return "+".join(kinds) + (" (eager)" if KERNELS.mode == "eager" else "")
