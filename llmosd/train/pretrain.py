"""The ``train`` job: pretrain a new model on uploaded text, or continue training a stored one.

``run(spec, store_root, ctl)`` is the job function (the daemon names it without importing torch:
torch is imported where the work starts).  It checks the spec again with the data it reads from
the store, trains in this process (``nproc`` 1) or in ``nproc`` ranks it launches
(``train.distributed``), and returns the manifest of the result with its lineage.

The loop (``Trainer``) is nanoGPT's: AdamW (weight decay on 2-D parameters only) with linear
warmup and cosine decay to ``min_lr``, gradient accumulation, clipping at 1.0, bf16 autocast
where the device has it, the validation loss every ``eval_every`` steps, ``last.pt`` every
``checkpoint_every`` steps, on pause and at the end, ``best.pt`` at each best validation loss.
A run called again with the same spec and checkpoint directory resumes from ``last.pt`` and
ends with the weights an uninterrupted run ends with, bit for bit on the CPU.
"""
from __future__ import annotations

import json
import math
import os
import time

BETAS = (0.9, 0.95)
CLIP = 1.0


class Paused(Exception):
    """The run stopped at a pause request, after writing its checkpoint."""


class Cancelled(Exception):
    """The run stopped at a cancel request (nothing written)."""


def lr_at(step: int, s: dict) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup``
    steps, then cosine decay from ``lr`` to ``min_lr`` at ``max_steps`` (nanoGPT's schedule)."""
    lr, low, warm, total = s["lr"], s["min_lr"], s["warmup"], s["max_steps"]
    if step < warm:
        return lr * (step + 1) / (warm + 1)
    ratio = min(1.0, (step - warm) / max(1, total - warm))
    return low + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - low)


def user_spec(spec: dict) -> dict:
    """The spec without the daemon's ``_`` keys (``_parent``)."""
    return {k: v for k, v in spec.items() if not k.startswith("_")}


def run(spec: dict, store_root: str, ctl) -> dict:
    """Job entry point: train as ``spec`` says; returns the manifest to publish.  Raises
    ValueError for bad input, Paused / Cancelled when asked to stop."""
    from llmosd.store.store import Store
    from llmosd.train.spec import check_train_spec
    store = Store(store_root)
    parent, sources = spec.get("_parent"), dict(spec.get("data") or {})
    ctl.progress({"stage": "data", "message": f"reading {len(sources)} data file(s)"})
    data = {name: store.read_blob(digest) for name, digest in sources.items()}
    s = check_train_spec(user_spec(spec), data, parent)
    if s["nproc"] > 1:
        from llmosd.train.distributed import CANCEL, launch
        stopped, ck = launch(s, store, parent, ctl)
        if stopped:
            raise (Cancelled if stopped == CANCEL else Paused)(f"{stopped} requested")
    else:
        ck = Trainer(s, data, load_parent(store, parent), ctl.job_dir, ctl).fit()
    return publish(store, s, sources, parent, ck, ctl.job_id)


def load_parent(store, parent: dict | None) -> dict | None:
    """What training needs of the model it continues: config, tokenizer, weights file."""
    if not parent:
        return None
    tok = parent["tokenizer"]
    store.verify_blob(parent["weights"]["digest"])
    return {"name": parent.get("name"), "digest": parent.get("digest"),
            "config": json.loads(store.read_blob(parent["config"]["digest"])),
            "tokenizer": store.read_blob(tok["digest"]), "tokenizer_type": tok["type"],
            "add_bos": tok.get("add_bos"), "weights": store.blob_path(parent["weights"]["digest"])}


def model_weights(ck: dict) -> dict:
    """The checkpoint's weights as the store keeps them: HF names, CPU, contiguous, float32,
    without the tied lm_head duplicate."""
    sd = {k: v.detach().float().cpu().contiguous() for k, v in ck["model"].items()}
    if ck["config"].get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    return sd


def publish(store, s: dict, sources: dict, parent: dict | None, ck: dict, job_id) -> dict:
    """Blobs (config, tokenizer, safetensors weights) and the manifest of the trained model."""
    from safetensors.torch import save as save_safetensors

    from llmosd.store.manifest import Blob, Manifest, Serving, train_lineage
    sd = model_weights(ck)
    config = Blob(*store.put_blob(json.dumps(ck["config"], sort_keys=True, indent=1).encode()))
    tokenizer = Blob(*store.put_blob(ck["tokenizer"]))
    weights = Blob(*store.put_blob(save_safetensors(sd, metadata={"format": "pt"})))
    serving = None
    if parent and ("chat_template" in parent or "defaults" in parent):
        serving = Serving(parent.get("chat_template"), dict(parent.get("defaults") or {}))
    return Manifest(parameters=sum(t.numel() for t in sd.values()), config=config,
                    tokenizer=tokenizer, tokenizer_type=ck["tokenizer_type"],
                    vocab_size=ck["config"]["vocab_size"], weights=weights, weights_dtype="float32",
                    lineage=train_lineage(s, sources, parent, job_id, ck["final"]),
                    add_bos=ck["add_bos"], serving=serving).to_dict()


def pick_device(name: str, local_rank: int = 0):
    """The torch device of ``spec["device"]``; ``cuda``/``auto`` give rank r its own GPU."""
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name}: this machine has no CUDA device")
    if name == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def peak_bytes(device) -> int:
    """The most memory this process has held for training (its metrics' ``mem_bytes``, which
    the daemon's reservation follows): on CUDA the caching allocator's peak on ``device`` (what
    the device gave it), else the process's peak resident set (torch runtime included).

    Not ``getrusage``'s ``ru_maxrss``: Linux carries it over from the parent across fork and
    exec, so a worker would report the daemon's peak as its own.  ``VmHWM`` belongs to this
    process's address space alone."""
    if device.type == "cuda":
        import torch
        return int(torch.cuda.max_memory_reserved(device))
    return own_peak_rss()


def own_peak_rss() -> int:
    """This process's peak resident set in bytes (``VmHWM`` of /proc/self/status; its current
    resident set where that is missing; 0 where neither can be read)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        for key in ("VmHWM", "VmRSS"):
            if key in fields:
                return int(fields[key].split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def amp_dtype(name: str, device):
    """The autocast dtype: bf16 where CUDA supports it (``auto``), as asked, or None (float32)."""
    import torch
    if name == "bfloat16" or (name == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def new_config(s: dict, tok):
    """A new model's config from the spec, as ``create`` makes one; the context is the block."""
    from llmosd.models.llama import LlamaConfig
    from llmosd.train.spec import default_hidden
    return LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=s["dim"], intermediate_size=default_hidden(s["dim"]),
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], max_position_embeddings=s["block_size"],
        rms_norm_eps=1e-5, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, dropout=s["dropout"])


class Trainer:
    """One rank's training run (``dist``: ``distributed.Solo`` in-process, or a ``Group``)."""

    def __init__(self, s: dict, data: dict, parent: dict | None, ckpt_dir: str, ctl, dist=None):
        import torch

        from llmosd.train import checkpoint
        from llmosd.train.distributed import Solo
        self.s, self.ctl, self.dir = s, ctl, ckpt_dir
        self.dist = dist or Solo()
        self.rank, self.world = self.dist.rank, self.dist.world
        self.device = pick_device(s["device"], self.dist.local_rank)
        self.amp = amp_dtype(s["dtype"], self.device)
        ck = checkpoint.load(os.path.join(ckpt_dir, checkpoint.LAST))
        if ck is not None:
            checkpoint.check_resumable(ck, s)
        self._tokens(ck, data, parent)
        self._model(ck, parent)
        self.params = self.trainable()
        decay = [p for p in self.params if p.dim() >= 2]
        other = [p for p in self.params if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": s["weight_decay"]}, {"params": other, "weight_decay": 0.0}],
            lr=s["lr"], betas=BETAS, fused=self.device.type == "cuda")
        self.step, self.best, self.final = 0, None, {"step": 0, "loss": None, "val_loss": None,
                                                     "best_val_loss": None}
        if ck is not None:
            self.opt.load_state_dict(ck["optimizer"])
            self.step, self.best, self.final = ck["step"], ck["final"]["best_val_loss"], dict(ck["final"])
            checkpoint.set_rng_state(ck["rng"])
            self.log(f"resuming from the checkpoint at step {self.step:,}")
        self.model = self.dist.wrap(self.raw, self.device)
        self.last_ck = ck

    def log(self, line: str) -> None:
        if self.rank == 0:
            self.ctl.log(line)

    # -- what a subclass (``finetune.FineTuner``) changes ------------------------------------
    def trainable(self) -> list:
        """The parameters the optimizer updates (and clipping sees), in a fixed order."""
        return list(self.raw.parameters())

    def model_state(self) -> dict:
        """What a checkpoint holds of the model (``last.pt``'s and ``best.pt``'s "model")."""
        return self.raw.state_dict()

    def checkpoint_extra(self) -> dict:
        """More entries for ``last.pt`` (a fine-tune records its base)."""
        return {}

    def uses_dropout(self) -> bool:
        """Whether micro-steps draw dropout masks (then seeded per micro-step)."""
        return self.s["dropout"] > 0

    def describe(self) -> str:
        """The first log line of a run: its size and data."""
        return (f"{self.raw.param_count():,} parameters, {len(self.train_tokens):,} training and "
                f"{len(self.val_tokens):,} validation tokens, device {self.device}")

    def train_loss(self, batch):
        """The loss of one micro-batch (``_batch``'s value) through the wrapped model."""
        x, y = batch
        return self._loss(self.model, x, y)

    def eval_record(self) -> dict:
        """More figures for the metrics record of an evaluation (besides val_loss)."""
        return {}

    def _tokens(self, ck, data: dict, parent) -> None:
        """The tokenizer (the checkpoint's, the parent's, or trained on rank 0) and the data's
        packed, split token stream."""
        from llmosd.models.loader import build_tokenizer
        from llmosd.train import data as D
        s, docs = self.s, D.documents(data)
        src = ck if ck is not None else parent
        if src is not None:
            self.tok_bytes, self.tok_type, self.add_bos = src["tokenizer"], src["tokenizer_type"], src["add_bos"]
        else:
            blob = None
            if self.rank == 0:
                self.ctl.progress({"stage": "tokenizer", "message": f"training a {s['tokenizer']} "
                                   f"tokenizer on {sum(map(len, docs)):,} characters"})
                blob = D.train_tokenizer(docs, s["tokenizer"], s["vocab_size"], s["seed"])
            # one tokenizer for every rank: rank 0's; new models encode prompts without BOS
            self.tok_bytes, self.tok_type, self.add_bos = self.dist.broadcast_object(blob), "sentencepiece", False
        self.tok = build_tokenizer(self.tok_type, self.tok_bytes, {"tokenizer": {"add_bos": self.add_bos}})
        self.train_tokens, self.val_tokens = D.split(D.pack(self.tok, docs, add_bos=True))
        need = s["block_size"] + 1
        if min(len(self.train_tokens), len(self.val_tokens)) < need:
            raise ValueError(f"the data is {len(self.train_tokens) + len(self.val_tokens):,} tokens: "
                             f"too few for one training block and one validation batch with "
                             f"block_size {s['block_size']:,}; add data or lower block_size")

    def _model(self, ck, parent) -> None:
        """The model: the checkpoint's weights, the parent's, or a new one from the seed."""
        import torch
        from llmosd.models.loader import float_weights

        from llmosd.models.llama import Llama, LlamaConfig, check_config
        s = self.s
        if ck is not None:
            cfg = LlamaConfig.from_dict(ck["config"])
        elif parent is not None:
            check_config(parent["config"])
            cfg = LlamaConfig.from_dict({**parent["config"], "dropout": s["dropout"]})
            if s["block_size"] > cfg.max_position_embeddings:
                raise ValueError(f"block_size ({s['block_size']:,}) exceeds the context of "
                                 f"{parent['name']} ({cfg.max_position_embeddings:,})")
        else:
            cfg = new_config(s, self.tok)
        self.cfg = cfg
        with torch.device("cpu"):
            model = Llama(cfg)
        if ck is not None:
            model.load_state_dict(ck["model"])
        elif parent is not None:
            model.load_weights(float_weights(parent["weights"]))
        else:
            model.init_weights(s["seed"])
        self.raw = model.to(self.device).train()

    def _batch(self, step: int, micro: int):
        import torch

        from llmosd.train import data as D
        s = self.s
        x, y = D.train_batch(self.train_tokens, s["block_size"], s["batch_size"], s["seed"], step,
                             micro, self.rank, self.world)
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def _loss(self, model, x, y):
        import torch
        import torch.nn.functional as F
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            logits = model(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))

    def train_step(self, step: int):
        """One optimizer step (all its micro-steps); returns the mean loss (a tensor)."""
        import torch

        from llmosd.train.data import dropout_seed
        s, ga = self.s, self.s["grad_accum"]
        total = torch.zeros((), device=self.device)
        for micro in range(ga):
            if self.uses_dropout():    # masks a function of the step, like the batches
                torch.manual_seed(dropout_seed(s["seed"], step, micro, self.rank))
            batch = self._batch(step, micro)
            with self.dist.no_sync(self.model, micro < ga - 1):
                loss = self.train_loss(batch)
                (loss / ga).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total / ga

    def evaluate(self) -> float:
        """The mean loss over the ``eval_batches`` validation batches, shared out by rank and
        run several batches to a forward pass (as many as keep the logits near 64M values)."""
        import numpy as np
        import torch

        from llmosd.train import data as D
        s, V = self.s, self.cfg.vocab_size
        mine = [D.val_batch(self.val_tokens, s["block_size"], s["batch_size"], s["seed"], k)
                for k in range(self.rank, s["eval_batches"], self.world)]
        rows = max(s["batch_size"], (1 << 26) // (s["block_size"] * V))
        acc = torch.zeros(2, device=self.device, dtype=torch.float64)
        self.raw.eval()
        with torch.no_grad():
            x_all = np.concatenate([x for x, _ in mine]) if mine else np.zeros((0, 1), np.int64)
            y_all = np.concatenate([y for _, y in mine]) if mine else x_all
            for i in range(0, len(x_all), rows):
                x = torch.from_numpy(x_all[i:i + rows]).to(self.device)
                y = torch.from_numpy(y_all[i:i + rows]).to(self.device)
                acc[0] += self._loss(self.raw, x, y).double() * y.numel()
                acc[1] += y.numel()
        self.raw.train()
        acc = self.dist.all_reduce(acc)
        return float(acc[0] / acc[1])

    def fit(self) -> dict | None:
        """Train to ``max_steps``; returns the final checkpoint (rank 0; None elsewhere)."""
        from llmosd.train.distributed import PAUSE, CANCEL
        s = self.s
        every = max(1, min(10, s["max_steps"] // 100))
        meter = Meter(self.s, self.world, self.step)
        if self.rank == 0 and self.step < s["max_steps"]:
            self.ctl.progress({"stage": "train", "message": f"step {self.step:,} of {s['max_steps']:,}"})
            self.log(self.describe())
        for step in range(self.step, s["max_steps"]):
            stop = self.dist.stop(self.ctl)
            if stop == PAUSE:
                self.save()
                self.log(f"paused at step {self.step:,}")
                raise Paused(f"paused at step {self.step:,}")
            if stop == CANCEL:
                raise Cancelled(f"cancelled at step {self.step:,}")
            for g in self.opt.param_groups:
                g["lr"] = lr_at(step, s)
            meter.add(self.train_step(step))
            self.step = done = step + 1
            val = self.evaluate() if done % s["eval_every"] == 0 or done == s["max_steps"] else None
            if val is not None:
                self._best(val)
            if done % every == 0 or val is not None:
                loss, last = meter.take(self.dist)
                self.final.update(step=done, loss=last, best_val_loss=self.best)
                if val is not None:
                    self.final["val_loss"] = val
                if self.rank == 0:
                    extra = self.eval_record() if val is not None else {}
                    self.ctl.metrics({**meter.record(done, loss, val, lr_at(step, s)), **extra,
                                      "mem_bytes": peak_bytes(self.device)})
            if done % s["checkpoint_every"] == 0 or done == s["max_steps"]:
                self.save()
        return self.last_ck if self.rank == 0 else None

    def _best(self, val: float) -> None:
        from llmosd.train import checkpoint
        better = self.best is None or val < self.best
        self.log(f"step {self.step:,}: validation loss {val:.4f}" + (" (best)" if better else ""))
        if better:
            self.best = val
            if self.rank == 0:
                checkpoint.save(os.path.join(self.dir, checkpoint.BEST),
                                {"version": checkpoint.VERSION, "step": self.step, "val_loss": val,
                                 "config": self.cfg.to_dict(), "model": self.model_state()})

    def save(self) -> None:
        """Write ``last.pt`` (rank 0) and tell the daemon."""
        from llmosd.train import checkpoint
        if self.rank != 0:
            return
        ck = {"version": checkpoint.VERSION, "step": self.step, "spec": self.s,
              "config": self.cfg.to_dict(), "model": self.model_state(),
              "optimizer": self.opt.state_dict(), "rng": checkpoint.rng_state(),
              "tokenizer": self.tok_bytes, "tokenizer_type": self.tok_type, "add_bos": self.add_bos,
              "final": dict(self.final, step=self.step, best_val_loss=self.best),
              **self.checkpoint_extra()}
        self.last_ck = ck
        checkpoint.save(os.path.join(self.dir, checkpoint.LAST), ck)
        self.ctl.checkpoint_saved(self.step)


class Meter:
    """Train loss and speed between two reports (the loss summed on the device: no sync per step)."""

    def __init__(self, s: dict, world: int, step: int):
        self.s, self.start = s, step
        self.tokens_per_step = s["batch_size"] * s["block_size"] * s["grad_accum"] * world
        self.sum, self.last, self.n, self.t = None, None, 0, time.perf_counter()

    def add(self, loss) -> None:
        self.sum = loss if self.sum is None else self.sum + loss
        self.last, self.n = loss, self.n + 1

    def take(self, dist) -> tuple[float, float]:
        """(mean loss since the last report, the last step's loss), averaged over the ranks."""
        import torch
        both = dist.all_reduce(torch.stack([self.sum, self.last]).double()) / dist.world
        self.sum = None
        return float(both[0]) / max(1, self.n), float(both[1])

    def record(self, step: int, loss: float, val: float | None, lr: float) -> dict:
        now = time.perf_counter()
        dt, n = max(now - self.t, 1e-9), self.n
        self.t, self.n = now, 0
        out = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": n * self.tokens_per_step / dt,
               "eta_s": (self.s["max_steps"] - step) * dt / max(1, n), "time": time.time()}
        if val is not None:
            out["val_loss"] = val
        return out
