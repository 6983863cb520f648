"""A Llama-family decoder in PyTorch (nanoGPT / gpt-fast style, one file).

RMSNorm, rotary position embeddings (HF "rotate_half" layout, configurable base and scaling),
grouped-query attention, SwiGLU MLP, optional tied embeddings.  Parameter names and config keys
are those of Hugging Face's LlamaForCausalLM, so a HF state dict loads as it is.

Shapes: B batch, T new tokens, S cached+new positions, H query heads, K kv heads, D head dim,
C model width, V vocabulary.  Two inference paths: a contiguous per-sequence ``KVCache``
(``forward(tokens, cache, start)``, also training's path without a cache) and the paged pool
(``PagedKV`` + ``paged_batch`` -> ``forward_paged``): the new tokens of several sequences as N
flattened rows for the linear layers, each sequence attending to its own blocks (N rows, P = blocks x block_size pool slots).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None
    dropout: float = 0.0            # training only (nanoGPT's places); inference never drops
    architectures: list = field(default_factory=lambda: ["LlamaForCausalLM"])
    model_type: str = "llama"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """Build from a HF-style dict; keys we do not model are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    def eos_ids(self) -> set[int]:
        e = self.eos_token_id
        return set(e) if isinstance(e, list) else ({e} if e is not None else set())


# What llmosd takes from a config, checked before anything is built (a declared size is
# only believed once the tensors that carry it are seen: see ``expected_shapes``).
CONFIG_INT_LIMITS = {
    "vocab_size": (1, 1 << 22), "hidden_size": (1, 65536), "intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024), "head_dim": (2, 4096),
    "max_position_embeddings": (1, 1 << 24),
}
CONFIG_FLOATS = ("rms_norm_eps", "rope_theta")          # finite and > 0
CONFIG_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias")


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config(d, names: dict[str, str] | None = None) -> None:
    """Raise ValueError naming the first key of the HF-style config dict ``d`` that llmosd
    cannot take: wrong type (a string where a number belongs), out of range, or sizes that do
    not divide.  Pure: nothing is allocated, so a config declaring two million layers costs
    nothing to refuse.  ``names`` maps our keys to the source's (GGUF metadata keys) for the
    message.  Absent keys take LlamaConfig's defaults and are checked as such."""
    def key(k):
        return (names or {}).get(k, k)
    if not isinstance(d, dict):
        raise ValueError(f"the config must be a JSON object ({{...}}), not a {type(d).__name__}")
    defaults = LlamaConfig.__dataclass_fields__
    val = {k: d.get(k, defaults[k].default) for k in CONFIG_INT_LIMITS}
    for k, (lo, hi) in CONFIG_INT_LIMITS.items():
        v = val[k]
        if v is None and k in ("num_key_value_heads", "head_dim"):
            continue                                    # derived from the others
        if not _is_int(v):
            raise ValueError(f"{key(k)} must be an integer, got {_short(v)}"
                             + (" (write it as a number, without quotes)" if isinstance(v, str) else ""))
        if not lo <= v <= hi:
            raise ValueError(f"{key(k)} is {v}; llmosd takes {lo} to {hi:,}")
    hidden, heads = val["hidden_size"], val["num_attention_heads"]
    kv, head_dim = val["num_key_value_heads"] or heads, val["head_dim"]
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"{key('hidden_size')} ({hidden}) must be a multiple of "
                             f"{key('num_attention_heads')} ({heads})")
        head_dim = hidden // heads
    if head_dim % 2:
        raise ValueError(f"the head size ({head_dim}) must be even for rotary embeddings")
    if heads % kv:
        raise ValueError(f"{key('num_attention_heads')} ({heads}) must be a multiple of "
                         f"{key('num_key_value_heads')} ({kv})")
    for k in CONFIG_FLOATS:
        v = d.get(k, defaults[k].default)
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
            raise ValueError(f"{key(k)} must be a finite number greater than 0, got {_short(v)}")
    p = d.get("dropout", 0.0)
    if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1):
        raise ValueError(f"{key('dropout')} must be a number from 0 to below 1, got {_short(p)}")
    for k in CONFIG_BOOLS:
        if not isinstance(d.get(k, False), bool):
            raise ValueError(f"{key(k)} must be true or false, got {_short(d[k])}")
    for k in ("bos_token_id", "pad_token_id", "eos_token_id"):
        v = d.get(k)
        ids = v if isinstance(v, list) and k == "eos_token_id" else [v]
        if len(ids) > 64 or not all(i is None or (_is_int(i) and i >= 0) for i in ids):
            raise ValueError(f"{key(k)} must be a token id (an integer >= 0), got {_short(v)}")
    sc = d.get("rope_scaling")
    if sc is not None:
        if not isinstance(sc, dict):
            raise ValueError(f"{key('rope_scaling')} must be an object or null, got {_short(sc)}")
        f = sc.get("factor", 1.0)
        if not (isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0):
            raise ValueError(f"{key('rope_scaling')}.factor must be a finite number greater than 0, "
                             f"got {_short(f)}")


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The tensors ``Llama(cfg).state_dict_for_save()`` holds, name -> shape, in its order,
    computed without building the model (so checking a checkpoint allocates nothing)."""
    c, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim

    def linear(name, out_f, in_f, bias):
        shapes[name + ".weight"] = (out_f, in_f)
        if bias:
            shapes[name + ".bias"] = (out_f,)
    shapes = {"model.embed_tokens.weight": (v, c)}
    ab, mb = cfg.attention_bias, cfg.mlp_bias
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        linear(p + "self_attn.q_proj", q, c, ab)
        linear(p + "self_attn.k_proj", kv, c, ab)
        linear(p + "self_attn.v_proj", kv, c, ab)
        linear(p + "self_attn.o_proj", c, q, ab)
        linear(p + "mlp.gate_proj", i, c, mb)
        linear(p + "mlp.up_proj", i, c, mb)
        linear(p + "mlp.down_proj", c, i, mb)
        shapes[p + "input_layernorm.weight"] = (c,)
        shapes[p + "post_attention_layernorm.weight"] = (c,)
    shapes["model.norm.weight"] = (c,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, c)
    return shapes


def check_shapes(cfg: LlamaConfig, shapes: dict[str, tuple], source: str = "the config") -> list[str]:
    """Raise ValueError naming the first tensor ``cfg`` implies that ``shapes`` (name -> shape)
    lacks or has misshapen, or the first it has beyond them (layers the config does not
    declare); returns the names the model uses, in order.  Shapes alone: nothing is read or
    allocated.  ``source`` names where the config came from, for the message."""
    ref = expected_shapes(cfg)
    shapes = {k: v for k, v in shapes.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    for k, s in ref.items():
        if k not in shapes:
            raise ValueError(f"tensor {k} is missing from the weights ({source} declares "
                             f"{cfg.num_hidden_layers} layers)")
        if tuple(shapes[k]) != s:
            raise ValueError(f"tensor {k} has shape {tuple(shapes[k])}, but {source} implies {s}")
    extra = sorted(set(shapes) - set(ref))
    if extra:
        raise ValueError(f"unexpected tensor {extra[0]} (and {len(extra) - 1} more): "
                         f"this is not a plain Llama checkpoint, or {source} declares too few layers")
    return list(ref)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """(D/2,) inverse frequencies, with HF's 'linear' and 'llama3' scaling, or explicit factors."""
    d = cfg.head_dim
    # on the CPU even while a model is built on the meta device (a meta float64 op would
    # import torch's compiler stack: ~70 MiB of RSS for nothing)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif kind == "factors":              # per-frequency divisors, as GGUF's rope_freqs.weight
        inv = inv / torch.tensor(sc["factors"], dtype=torch.float64, device="cpu")
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    return inv.float()


def drop(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout in training only, and only when p > 0: inference (and p = 0) is left untouched,
    without a kernel launch or a draw from the random generator."""
    return F.dropout(x, p, True) if training and p > 0 else x


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (as HF does) so fp16/bf16 weights give the same statistics.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache:
    """Per-sequence key/value cache: layers x (B, K, capacity, D), filled left to right."""

    def __init__(self, cfg: LlamaConfig, capacity: int, batch: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.capacity = capacity

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def lazy_zeros(shape, device, dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape) whose CPU memory is committed only as it is first written: numpy's
    zeros is calloc, whose large blocks are fresh (zero) pages from the OS, so an instance's
    KV pool costs RSS as its blocks fill, not at load.  Zeros (never garbage), so masked
    padding never reads NaN.  Other devices: torch.zeros."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    import numpy as np
    n = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(n, dtype=np.uint8)).view(dtype).view(shape)


class PagedKV:
    """The paged key/value pool of an instance: for k and v, layers x (num_blocks, block_size,
    K, D) in one tensor each.  A sequence's position p lives in slot
    ``table[p // block_size] * block_size + p % block_size`` of its block table."""

    def __init__(self, cfg: LlamaConfig, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k = lazy_zeros(shape, device, dtype)
        self.v = lazy_zeros(shape, device, dtype)
        self.num_blocks, self.block_size = num_blocks, block_size

    def slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s k and v as (num_blocks * block_size, K, D) views."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def block_bytes(self) -> int:
        return self.nbytes() // self.num_blocks


@dataclass
class AttnGroup:
    """Sequences attended in one SDPA call: rows r0 .. r0 + B*T of the batch (B sequences of T
    new tokens each); ``gather`` (B, S) the pool slots of their positions 0..S-1 (padded);
    ``mask`` (B, 1, T, S) bool (True: may attend) or None with ``causal`` (prefill at 0)."""
    r0: int
    B: int
    T: int
    gather: torch.Tensor
    mask: torch.Tensor | None
    causal: bool = False


@dataclass
class PagedBatch:
    """One paged forward's inputs, shared by every layer: tokens, positions and slots (N,)
    of the N new rows, and the attention groups covering them in row order."""
    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    groups: list


def _slot_index(tables: torch.Tensor, pos: torch.Tensor, bs: int) -> torch.Tensor:
    """tables (B, nb) block ids, pos (B, S) positions -> (B, S) pool slots."""
    return tables.gather(1, torch.div(pos, bs, rounding_mode="floor")) * bs + pos % bs


def _tables(rows: list[list[int]], width: int, fill: int) -> torch.Tensor:
    """Block tables right-padded with ``fill`` to ``width`` -> (B, width) int64."""
    return torch.tensor([list(r[:width]) + [fill] * (width - len(r[:width])) for r in rows], dtype=torch.long)


def paged_batch(seqs: list[tuple[list[int], int, list[int]]], block_size: int, device,
                *, pad_batch: int = 0, pad_len: int = 0, scratch: int = 0,
                force_mask: bool = False) -> tuple[PagedBatch, list[int]]:
    """The batch for ``seqs`` = [(new ids, start, block table)]: single-token sequences form
    one group (first), each longer chunk its own.  Returns the batch and, per sequence in the
    given order, the row of its last token.  ``pad_batch`` pads the single-token group to that
    many rows and ``pad_len`` its gathered length to that many positions (static shapes for
    CUDA graphs): padding rows write to and read from block ``scratch``.  ``force_mask``: the
    single-token group always carries a mask (a graph's static input)."""
    bs = block_size
    dec = [i for i, (ids, _, _) in enumerate(seqs) if len(ids) == 1]
    chunks = [i for i, (ids, _, _) in enumerate(seqs) if len(ids) > 1]
    tokens, positions, slots, groups, last = [], [], [], [], [0] * len(seqs)
    if dec or pad_batch:
        B = max(len(dec), pad_batch)
        lens = [seqs[i][1] + 1 for i in dec] + [1] * (B - len(dec))
        S = max(max(lens), pad_len)
        nb = -(-S // bs)
        tables = _tables([seqs[i][2] for i in dec] + [[scratch]] * (B - len(dec)), nb, scratch)
        pos = torch.arange(S).expand(B, S)
        gather = _slot_index(tables, pos, bs)                                   # (B, S)
        ln = torch.tensor(lens)
        here = ln - 1
        slots.append(gather.gather(1, here[:, None])[:, 0])
        positions.append(here)
        tokens += [seqs[i][0][0] for i in dec] + [0] * (B - len(dec))
        mask = None
        if force_mask or B > 1 or S > lens[0]:
            mask = (pos < ln[:, None])[:, None, None, :].to(device)            # (B, 1, 1, S)
        groups.append(AttnGroup(0, B, 1, gather.to(device), mask))
        for r, i in enumerate(dec):
            last[i] = r
    for i in chunks:
        ids, start, table = seqs[i]
        T, S = len(ids), start + len(ids)
        nb = -(-S // bs)
        gather = _slot_index(_tables([table], nb, scratch), torch.arange(S)[None], bs)   # (1, S)
        r0 = len(tokens)
        q = torch.arange(start, S)
        slots.append(gather[0, start:])
        positions.append(q)
        tokens += list(ids)
        if start == 0:
            mask, causal = None, True
        else:                             # row t sees positions <= start + t
            mask, causal = (torch.arange(S)[None, :] <= q[:, None])[None, None].to(device), False
        groups.append(AttnGroup(r0, 1, T, gather.to(device), mask, causal))
        last[i] = r0 + T - 1
    pb = PagedBatch(torch.tensor(tokens, dtype=torch.long, device=device), torch.cat(positions).to(device),
                    torch.cat(slots).to(device), groups)
    return pb, last


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.h, self.k, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.p = cfg.dropout
        c, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(c, self.h * self.d, bias=b)
        self.k_proj = nn.Linear(c, self.k * self.d, bias=b)
        self.v_proj = nn.Linear(c, self.k * self.d, bias=b)
        self.o_proj = nn.Linear(self.h * self.d, c, bias=b)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.d).transpose(1, 2)   # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.k, self.d).transpose(1, 2)   # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.k, self.d).transpose(1, 2)
        q = (q * cos + rotate_half(q) * sin).to(v.dtype)
        k = (k * cos + rotate_half(k) * sin).to(v.dtype)
        if cache is not None:
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k = cache.k[layer][:, :, :start + T]                          # (B, K, S, D)
            v = cache.v[layer][:, :, :start + T]
        if T == 1:
            mask, causal = None, False          # one new token sees every cached position
        elif start == 0:
            mask, causal = None, True
        else:                                   # chunk after a cached prefix: row i sees <= start+i
            S = start + T
            mask = torch.arange(S, device=x.device)[None, :] <= (start + torch.arange(T, device=x.device))[:, None]
            causal = False
        p = self.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p,
                                           enable_gqa=self.h != self.k)   # (B, H, T, D)
        return drop(self.o_proj(y.transpose(1, 2).reshape(B, T, self.h * self.d)), p, self.training)

    def forward_paged(self, x, cos, sin, kv: "PagedKV", layer: int, pb: "PagedBatch") -> torch.Tensor:
        """x (N, C): the new tokens of every sequence of ``pb``, flattened -> (N, C).  Their
        k/v go into the pool's slots; each attention group reads its sequences' K/V back
        through their block tables (inference only: no dropout)."""
        N = x.shape[0]
        q = self.q_proj(x).view(N, self.h, self.d)                        # (N, H, D)
        k = self.k_proj(x).view(N, self.k, self.d)                        # (N, K, D)
        v = self.v_proj(x).view(N, self.k, self.d)
        q = (q * cos + rotate_half(q) * sin).to(v.dtype)                  # cos, sin (N, 1, D)
        k = (k * cos + rotate_half(k) * sin).to(v.dtype)
        kc, vc = kv.slots(layer)                                          # (P, K, D) each
        kc.index_copy_(0, pb.slots, k.to(kc.dtype))
        vc.index_copy_(0, pb.slots, v.to(vc.dtype))
        ys = []
        for g in pb.groups:
            qg = q[g.r0:g.r0 + g.B * g.T].view(g.B, g.T, self.h, self.d).transpose(1, 2)  # (B, H, T, D)
            kg = kc[g.gather].transpose(1, 2).to(q.dtype)                 # (B, S, K, D) -> (B, K, S, D)
            vg = vc[g.gather].transpose(1, 2).to(q.dtype)
            y = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, is_causal=g.causal,
                                               enable_gqa=self.h != self.k)                 # (B, H, T, D)
            ys.append(y.transpose(1, 2).reshape(g.B * g.T, self.h * self.d))
        return self.o_proj(ys[0] if len(ys) == 1 else torch.cat(ys))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        c, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.p = cfg.dropout
        self.gate_proj = nn.Linear(c, i, bias=b)
        self.up_proj = nn.Linear(c, i, bias=b)
        self.down_proj = nn.Linear(i, c, bias=b)

    def forward(self, x):
        return drop(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), self.p, self.training)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, layer, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_paged(self, x, cos, sin, kv, layer, pb):
        x = x + self.self_attn.forward_paged(self.input_layernorm(x), cos, sin, kv, layer, pb)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def init_weights(self, seed: int, std: float = 0.02) -> None:
        """Random init as HF does (normal(0, 0.02), norms at 1), reproducible from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)

    def rope(self, start: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + T, device=device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]                     # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)                            # (T, D)
        return emb.cos(), emb.sin()

    def hidden(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """tokens (B, T) at positions start..start+T-1 -> final hidden states (B, T, C), before
        the last norm."""
        B, T = tokens.shape
        if start + T > (cache.capacity if cache is not None else self.config.max_position_embeddings):
            raise ValueError(f"sequence of {start + T} tokens exceeds the context")
        x = drop(self.model.embed_tokens(tokens), self.config.dropout, self.training)
        cos, sin = self.rope(start, T, tokens.device)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache, i, start)
        return x

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) at positions start..start+T-1 -> logits (B, T or 1, V) in float32."""
        x = self.hidden(tokens, cache, start)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)).float()

    def rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (N,) int -> cos, sin (N, 1, D), the same values ``rope`` gives."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]   # (N, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]                     # (N, 1, D)
        return emb.cos(), emb.sin()

    def hidden_paged(self, pb: "PagedBatch", kv: "PagedKV") -> torch.Tensor:
        """The rows of ``pb`` (N new tokens of several sequences over the paged cache ``kv``)
        -> final hidden states (N, C), before the last norm.  Inference only."""
        x = self.model.embed_tokens(pb.tokens)                             # (N, C)
        cos, sin = self.rope_at(pb.positions)
        for i, layer in enumerate(self.model.layers):
            x = layer.forward_paged(x, cos, sin, kv, i, pb)
        return x

    def forward_paged(self, pb: "PagedBatch", kv: "PagedKV",
                      rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (R, V) in float32 of the rows ``rows`` (R,) of ``pb`` (None: every row)."""
        x = self.hidden_paged(pb, kv)
        if rows is not None:
            x = x.index_select(0, rows)
        return self.lm_head(self.model.norm(x)).float()

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """HF-named tensors, contiguous, without the tied lm_head duplicate."""
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    def load_weights(self, sd, shapes: dict[str, tuple] | None = None) -> None:
        """Load HF-named tensors, checking names and shapes first (``check_shapes``); raises
        ValueError naming the problem.  ``sd`` maps names to tensors; with ``shapes`` given it
        may be lazy (a safetensors file read one tensor at a time, so peak memory stays near
        the model's)."""
        own = self.state_dict()
        names = check_shapes(self.config, shapes or {k: tuple(v.shape) for k, v in sd.items()})
        with torch.no_grad():
            for k in names:
                own[k].copy_(sd[k])

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
