"""Memory estimates before the fact, corrected by what was measured.  Pure: no torch.

- ``estimate_instance``: the bytes a loaded model's own tensors hold (what
  ``models.loader.resident_bytes`` measures): its ``parameters`` (from the manifest) in the
  dtype it is computed in, plus the rotary buffer; an adapter or classifier on a base: its own
  parameters in float32 (they stay float32 whatever the base's dtype).  KV cache is not part of
  it: running requests reserve theirs apart.
- ``estimate_job``: a training job's peak: float32 weights, gradients and AdamW's two states of
  the trainable parameters, activations (~ batch x block x (hidden x layers x k + vocab x k')),
  and a worker's fixed overhead (the torch runtime).
- ``Estimator``: a ratio measured/estimated per key (e.g. ("instance", "float32")), learned as
  an exponential average and applied to later estimates of that key.
"""
from __future__ import annotations

F32 = 4
JOB_OVERHEAD = 384 << 20         # a worker's torch runtime (CPU: its RSS before any tensor)
ACT_PER_LAYER = 16               # float32 values saved per token per hidden unit per layer
LOGIT_COPIES = 3                 # logits, their log-softmax and its gradient, per token x vocab

__all__ = ["Estimator", "estimate_instance", "estimate_job", "parameter_count"]


def _kind(manifest: dict) -> str:
    k = manifest.get("kind")
    return k if k in ("adapter", "classifier") else "model"


def _head_dim(config: dict) -> int:
    h, heads = int(config.get("hidden_size", 0)), int(config.get("num_attention_heads", 1) or 1)
    return int(config.get("head_dim") or h // heads)


QUANT_BYTES = {"int8": 1 + 2 / 32, "int4": 0.5 + 4 / 32}   # per weight: q + float16 scale (+ min) per 32


def estimate_instance(manifest: dict, dtype_bytes: int, config: dict | None = None,
                      quant: str = "auto") -> int:
    """Bytes ``manifest``'s model holds once loaded with weights of ``dtype_bytes`` bytes each
    (4 float32, 2 bfloat16/float16).  An adapter or classifier with a base (no weights of its
    own): its own parameters, float32 (what attaching it adds to the base's instance).
    ``config`` (optional, the model config dict) adds the rotary buffer exactly; without it a
    small allowance stands in.  (``config`` is an addition to the design's signature.)
    ``quant`` (the load's, issue 13): "auto" on a model stored quantized (``weights.quant``)
    holds the stored bytes (memory-mapped as they are); "int8"/"int4" quantize at load (group
    32: 1.0625 / 0.625 bytes a weight); "none" and float models: ``dtype_bytes`` a weight."""
    params = int(manifest.get("parameters") or 0)
    weights = manifest.get("weights")
    if _kind(manifest) != "model" and not isinstance(weights, dict):
        return params * F32
    rotary = (_head_dim(config) // 2) * F32 if config else 256
    if quant == "auto" and isinstance(weights, dict) and weights.get("quant") and weights.get("size"):
        return int(weights["size"]) + rotary
    if quant in QUANT_BYTES:
        return int(params * QUANT_BYTES[quant]) + rotary
    return params * dtype_bytes + rotary


def parameter_count(config: dict) -> int:
    """Parameters of a Llama-family model with ``config`` (as ``Llama.param_count()``)."""
    c = int(config["hidden_size"])
    v, i, n = int(config["vocab_size"]), int(config["intermediate_size"]), int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kvh = int(config.get("num_key_value_heads") or heads)
    hd = _head_dim(config)
    q, kv = heads * hd, kvh * hd
    ab, mb = bool(config.get("attention_bias")), bool(config.get("mlp_bias"))
    attn = c * q + 2 * c * kv + q * c + ((q + 2 * kv + c) if ab else 0)
    mlp = 3 * c * i + ((2 * i + c) if mb else 0)
    per_layer = attn + mlp + 2 * c
    emb = v * c * (1 if config.get("tie_word_embeddings") else 2)
    return emb + n * per_layer + c


def _trainable(config: dict, spec: dict) -> int:
    """Trainable parameters of a job ``spec``: all of them (train, full fine-tuning), the LoRA
    matrices (lora; classify without head_only adds the head), or the head alone."""
    method = spec.get("method", "full")
    c, n = int(config["hidden_size"]), int(config["num_hidden_layers"])
    head = len(spec.get("labels") or []) * c if method == "classify" else 0
    if method == "full":
        return parameter_count(config)
    if method == "classify" and spec.get("head_only"):
        return head
    hd = _head_dim(config)
    q = int(config["num_attention_heads"]) * hd
    kv = int(config.get("num_key_value_heads") or config["num_attention_heads"]) * hd
    i = int(config["intermediate_size"])
    shapes = {"q_proj": (c, q), "k_proj": (c, kv), "v_proj": (c, kv), "o_proj": (q, c),
              "gate_proj": (c, i), "up_proj": (c, i), "down_proj": (i, c)}
    rank = int(spec.get("rank", 8))
    targets = spec.get("targets") or ("q_proj", "v_proj")
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)]
    targets = list(shapes) if names == ["all-linear"] else names
    lora = sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)
    return n * lora + head


def estimate_job(config: dict, spec: dict, trainable: int | None = None) -> int:
    """Peak bytes of a training or fine-tuning job on model ``config`` (dict) with ``spec``
    (batch_size, block_size, method, rank, targets, labels, head_only): float32 weights,
    gradients and two AdamW states of the ``trainable`` parameters (None: from the spec),
    activations, logits and the worker's fixed overhead."""
    params = parameter_count(config)
    t = _trainable(config, spec) if trainable is None else int(trainable)
    b, s = int(spec.get("batch_size", 1)), int(spec.get("block_size", 128))
    c, n, v = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["vocab_size"])
    heads = int(config["num_attention_heads"])
    weights = params * F32 + (t if spec.get("method") in ("lora", "classify") else 0) * F32
    optim = t * F32 * 3                          # gradient + AdamW exp_avg + exp_avg_sq
    act = b * s * (c * n * ACT_PER_LAYER + v * LOGIT_COPIES) * F32
    attn = b * heads * s * s * n * F32           # attention probabilities kept for backward
    return weights + optim + act + attn + JOB_OVERHEAD


class Estimator:
    """Estimates corrected by measurements: per key, the ratio measured / estimated, learned as
    an exponential average (weight ``alpha`` for the newest) and clamped to [1/8, 8] so one odd
    measurement cannot make every later estimate absurd.  One thread (the control loop)."""

    LOW, HIGH = 0.125, 8.0

    def __init__(self, alpha: float = 0.5):
        self.alpha = alpha
        self.ratios: dict = {}

    def ratio(self, key) -> float:
        return self.ratios.get(key, 1.0)

    def correct(self, key, estimate: int) -> int:
        """``estimate`` times what ``key`` has learned (1.0 before any measurement)."""
        return int(round(estimate * self.ratio(key)))

    def _set(self, key, r: float) -> None:
        r = min(self.HIGH, max(self.LOW, r))
        old = self.ratios.get(key)
        self.ratios[key] = r if old is None else (1 - self.alpha) * old + self.alpha * r

    def learn(self, key, estimate: int, measured: int) -> None:
        """Record that what was estimated ``estimate`` (uncorrected) measured ``measured``.
        Non-positive values teach nothing."""
        if estimate > 0 and measured > 0:
            self._set(key, measured / estimate)

    def learn_oom(self, key, estimate: int, free: int) -> None:
        """An out-of-memory error loading what was estimated ``estimate`` (uncorrected) while
        ``free`` bytes were free: it needs more than that, so the ratio rises at least past
        free / estimate (and by a quarter at least).  An addition to the design."""
        if estimate <= 0:
            return
        floor = max(self.ratio(key) * 1.25, 1.1 * free / estimate)
        self.ratios[key] = min(self.HIGH, max(self.LOW, floor))
