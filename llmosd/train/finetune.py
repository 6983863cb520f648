"""The ``finetune`` job: full, LoRA or classification fine-tuning of a stored model.

``run(spec, store_root, ctl)`` is the job function (named by the daemon as a string; torch is
imported where the work starts).  ``spec`` is the finetune spec with ``data``, ``val_data``
and ``_base`` (the base's name, manifest digest and manifest entries).  It checks the spec
again with the data, trains in this process (``nproc`` 1) or in ``nproc`` ranks
(``train.distributed``), and returns the manifest to publish: a full model (``full``), an
adapter (``lora``) or a classifier (``classify``) on the base.

``FineTuner`` is ``pretrain.Trainer`` (AdamW, schedule, accumulation, clipping, checkpoints,
pause/cancel, bitwise resume, DDP) with other parameters, batches and evaluation:

- full: every parameter trains (dropout from the spec); lora: a LoRA adapter trains on the
  frozen base; classify: a head (``score.weight``) on the last token's normalised hidden
  state, with a LoRA adapter unless ``head_only``.
- batches: ``sft.batch_indices`` (a pure function of seed and step: resume sees the same
  ones), right-padded; the loss is on the trained tokens only (targets IGNORE elsewhere), or
  the cross entropy of the head's logits.
- ``last.pt`` holds only what trains for lora/classify (PEFT-named adapter tensors and the
  head) with the optimizer and RNG states; the base is read again from the store on resume
  and must be the same weights.
- validation (``metrics.evaluate``, the functions ``llmctl eval`` runs): loss, perplexity,
  and accuracy/F1 or exact match/chrF; ``<job_dir>/val_predictions.jsonl`` holds the last
  evaluation's predictions.
"""
from __future__ import annotations

import functools
import json
import os

from llmosd.train.pretrain import Trainer, load_parent, user_spec

ADAPTER = "finetuned"   # the adapter's name inside the model being trained


def base_facts(base: dict, cfg: dict) -> dict:
    """What ``check_finetune_spec`` needs to know of the base."""
    from llmosd.models.lora import TARGETS
    return {"name": base.get("name"), "context": cfg.get("max_position_embeddings"),
            "has_template": bool(base.get("chat_template")), "targets_known": TARGETS}


def load_base(store, base: dict) -> dict:
    """``pretrain.load_parent``'s view of the base (its weights' digest checked) plus its chat
    template and the weights' digest (what a checkpoint must have been trained on)."""
    out = load_parent(store, base)
    out.update(chat_template=base.get("chat_template"), defaults=base.get("defaults"),
               weights_digest=base["weights"]["digest"])
    return out


def read_files(store, files: dict | None) -> dict | None:
    return {name: store.read_blob(d) for name, d in files.items()} if files else None


def run(spec: dict, store_root: str, ctl) -> dict:
    """Job entry point: fine-tune as ``spec`` says; returns the manifest to publish.  Raises
    ValueError for bad input, Paused / Cancelled when asked to stop."""
    from llmosd.store.store import Store
    from llmosd.train.pretrain import Cancelled, Paused
    from llmosd.train.ftspec import check_finetune_spec
    store = Store(store_root)
    base = spec["_base"]
    sources, vsources = dict(spec.get("data") or {}), dict(spec.get("val_data") or {})
    ctl.progress({"stage": "data", "message": f"reading {len(sources) + len(vsources)} data file(s)"})
    data, val = read_files(store, sources), read_files(store, vsources)
    cfg = json.loads(store.read_blob(base["config"]["digest"]))
    # the daemon checked it at submit; again here (the check is idempotent) against the data
    # and base as this worker reads them
    s = check_finetune_spec(user_spec(spec), data, val, base_facts(base, cfg))
    if s["nproc"] > 1:
        from llmosd.train.distributed import CANCEL, launch
        stopped, ck = launch(s, store, base, ctl)
        if stopped:
            raise (Cancelled if stopped == CANCEL else Paused)(f"{stopped} requested")
    else:
        ck = FineTuner(s, data, load_base(store, base), ctl.job_dir, ctl, val_data=val).fit()
    return publish(store, s, sources, base, ck, ctl.job_id)


def lora_config(s: dict):
    """The LoraConfig of a spec (None for full and head-only classification)."""
    from llmosd.models.lora import LoraConfig, resolve_targets
    if s["method"] == "full" or (s["method"] == "classify" and s.get("head_only")):
        return None
    return LoraConfig(s["rank"], float(s["alpha"]), float(s.get("lora_dropout") or 0.0),
                      resolve_targets(s["targets"]))


def split_trained(sd: dict) -> tuple[dict, object]:
    """(LoRA tensors, head or None) of a lora/classify checkpoint's "model"."""
    return {k: v for k, v in sd.items() if k != "score.weight"}, sd.get("score.weight")


def publish(store, s: dict, sources: dict, base: dict, ck: dict, job_id) -> dict:
    """Blobs and the manifest of a finished fine-tune (``ck``: its final checkpoint)."""
    from safetensors.torch import save as save_safetensors

    from llmosd.store.manifest import AdapterManifest, Blob, Manifest, Serving, finetune_lineage
    from llmosd.train.pretrain import model_weights
    lineage = finetune_lineage(s, sources, base, job_id, ck["final"])
    if s["method"] == "full":
        sd = model_weights(ck)
        weights = Blob(*store.put_blob(save_safetensors(sd, metadata={"format": "pt"})))
        tok = base["tokenizer"]
        serving = None
        if "chat_template" in base or "defaults" in base:
            serving = Serving(base.get("chat_template"), dict(base.get("defaults") or {}))
        return Manifest(parameters=sum(t.numel() for t in sd.values()),
                        config=Blob(base["config"]["digest"], base["config"]["size"]),
                        tokenizer=Blob(tok["digest"], tok["size"]), tokenizer_type=tok["type"],
                        vocab_size=tok.get("vocab_size") or ck["config"]["vocab_size"],
                        weights=weights, weights_dtype="float32", lineage=lineage,
                        add_bos=tok.get("add_bos"), serving=serving).to_dict()
    tensors, head = split_trained(ck["model"])
    adapter = head_blob = None
    lcfg = lora_config(s)
    if tensors:
        adapter = Blob(*store.put_blob(save_safetensors(tensors, metadata={"format": "pt"})))
    if head is not None:
        head_blob = Blob(*store.put_blob(save_safetensors({"score.weight": head.contiguous()},
                                                          metadata={"format": "pt"})))
    n = sum(t.numel() for t in tensors.values()) + (head.numel() if head is not None else 0)
    return AdapterManifest(base=base, base_name=base["name"], base_digest=base["digest"],
                           lineage=lineage, parameters=n, adapter=adapter,
                           lora=lcfg.to_dict() if lcfg is not None else None, head=head_blob,
                           labels=list(s.get("labels") or []) if head is not None else None).to_dict()


@functools.lru_cache(maxsize=1)
def _net_class():
    """``FtNet`` (made on first use: torch is imported by the work, not by naming the job)."""
    from torch import nn

    class FtNet(nn.Module):
        """The model being fine-tuned, as DDP wraps it: the Llama ``lm`` and, for a classifier,
        its head ``score`` (L, C).  forward: a causal model's logits of (B, T) ids, or a
        classifier's (B, L) logits of a list of id lists."""

        def __init__(self, lm, head=None):
            super().__init__()
            self.lm = lm
            self.score = nn.Parameter(head) if head is not None else None

        def forward(self, x):
            if self.score is None:
                return self.lm(x)
            from llmosd.models import classifier
            return classifier.head_logits(self.lm, self.score, x, self.score.device)

    return FtNet


class FineTuner(Trainer):
    """One rank's fine-tuning run; ``data`` and ``val_data`` are {file: bytes} (JSONL),
    ``parent`` the base as ``load_base`` gives it."""

    def __init__(self, s: dict, data: dict, parent: dict, ckpt_dir: str, ctl, dist=None,
                 val_data: dict | None = None):
        self.val_data = val_data
        self.figures: dict = {}
        super().__init__(s, data, parent, ckpt_dir, ctl, dist)

    @property
    def classify(self) -> bool:
        return self.s["method"] == "classify"

    def _tokens(self, ck, data: dict, parent) -> None:
        """The base's tokenizer (with its chat template) and the examples, encoded."""
        from llmosd.models.loader import build_tokenizer
        from llmosd.train import sft
        s = self.s
        self.tok_bytes, self.tok_type, self.add_bos = parent["tokenizer"], parent["tokenizer_type"], parent["add_bos"]
        self.tok = build_tokenizer(self.tok_type, self.tok_bytes,
                                   {"tokenizer": {"add_bos": self.add_bos},
                                    "chat_template": parent.get("chat_template")})
        examples = sft.parse_examples(data)
        val = sft.parse_examples(self.val_data) if self.val_data else None
        self.kind = sft.dataset_kind(examples)
        self.labels = list(s.get("labels") or [])
        train, self.val_ex = sft.split_examples(examples, s["seed"], val)
        max_len = s["block_size"] + (0 if self.classify else 1)
        enc = [sft.encode(self.tok, ex, max_len=max_len) for ex in train]
        if self.classify:
            self.train_enc = enc
            self.train_y = [self.labels.index(ex.label) for ex in train]
        else:           # an example whose answer the block cuts off would only add nothing
            keep = [i for i, e in enumerate(enc) if any(e[1][1:])]
            if not keep:
                raise ValueError(f"no training example keeps an answer token within block_size "
                                 f"{s['block_size']:,}: raise block_size or shorten the prompts")
            if len(keep) < len(enc) and self.rank == 0:
                self.ctl.log(f"{len(enc) - len(keep):,} training examples have no answer within "
                             f"block_size {s['block_size']:,} and are left out")
            self.train_enc = [enc[i] for i in keep]
        self.val_enc = [sft.encode(self.tok, ex, max_len=max_len) for ex in self.val_ex]

    def _model(self, ck, parent) -> None:
        """The base's weights, then what trains: all of it (full, the checkpoint's weights on
        resume), or a LoRA adapter and/or a head (fresh from the seed, or the checkpoint's)."""
        import torch
        from llmosd.models.loader import float_weights

        from llmosd.models import classifier, lora
        from llmosd.models.llama import Llama, LlamaConfig, check_config, rope_inv_freq
        s = self.s
        check_config(parent["config"])
        cfg = LlamaConfig.from_dict({**parent["config"], "dropout": s["dropout"]})
        if s["block_size"] > cfg.max_position_embeddings:
            raise ValueError(f"block_size ({s['block_size']:,}) exceeds the context of "
                             f"{parent['name']} ({cfg.max_position_embeddings:,})")
        if ck is not None and ck.get("base_weights") != parent.get("weights_digest"):
            raise ValueError(f"the checkpoint at step {ck['step']:,} was made on other weights of "
                             f"{parent['name']} than the store holds now; remove the job to start over")
        self.cfg, self.base_weights = cfg, parent.get("weights_digest")
        with torch.device("meta"):
            lm = Llama(cfg)
        lm = lm.to_empty(device="cpu")
        lm.inv_freq = rope_inv_freq(cfg)
        if cfg.tie_word_embeddings:
            lm.lm_head.weight = lm.model.embed_tokens.weight
        lm.load_weights(float_weights(parent["weights"]))
        head = None
        if s["method"] == "full":
            if ck is not None:
                lm.load_state_dict(ck["model"])
        else:
            lm.requires_grad_(False)
            trained = split_trained(ck["model"]) if ck is not None else ({}, None)
            lcfg = lora_config(s)
            if lcfg is not None:
                lora.add_adapter(lm, ADAPTER, lcfg, trained[0] if ck is not None else None,
                                 seed=s["seed"], trainable=True)
                lora.set_active(lm, ADAPTER)
            if self.classify:
                head = (trained[1].clone() if ck is not None else
                        classifier.new_head(cfg.hidden_size, len(self.labels), s["seed"]))
        self.raw = _net_class()(lm, head).to(self.device).train()

    # -- the hooks of Trainer ------------------------------------------------------------------
    def trainable(self) -> list:
        return [p for p in self.raw.parameters() if p.requires_grad]

    def model_state(self) -> dict:
        """full: the model's state dict (HF names); else the LoRA tensors (PEFT names) and
        the head (``score.weight``), on the CPU in float32."""
        from llmosd.models import lora
        if self.s["method"] == "full":
            return self.raw.lm.state_dict()
        out = lora.adapter_tensors(self.raw.lm, ADAPTER) if lora_config(self.s) is not None else {}
        if self.raw.score is not None:
            out["score.weight"] = self.raw.score.detach().to("cpu").float().contiguous()
        return out

    def checkpoint_extra(self) -> dict:
        return {"base_weights": self.base_weights}

    def uses_dropout(self) -> bool:
        lcfg = lora_config(self.s)
        return self.s["dropout"] > 0 or (lcfg is not None and lcfg.dropout > 0)

    def describe(self) -> str:
        total = sum(p.numel() for p in self.raw.parameters())
        n = sum(p.numel() for p in self.params)
        line = (f"{n:,} of {total:,} parameters train ({self.s['method']}), {len(self.train_enc):,} "
                f"training and {len(self.val_ex):,} validation examples, device {self.device}")
        if self.classify:
            from collections import Counter
            top, _ = Counter(self.train_y).most_common(1)[0]
            base = sum(ex.label == self.labels[top] for ex in self.val_ex) / max(1, len(self.val_ex))
            line += f"; majority baseline ({self.labels[top]}): accuracy {base:.4f}"
        return line

    def _batch(self, step: int, micro: int):
        import torch

        from llmosd.train import sft
        from llmosd.train.metrics import pad_causal
        s = self.s
        idx = sft.batch_indices(len(self.train_enc), s["batch_size"], s["seed"], step, micro,
                                s["grad_accum"], self.rank, self.world)
        if self.classify:
            return ([self.train_enc[i][0] for i in idx],
                    torch.tensor([self.train_y[i] for i in idx], device=self.device))
        return pad_causal([self.train_enc[i] for i in idx], self.device)

    def train_loss(self, batch):
        if not self.classify:
            return super().train_loss(batch)
        import torch
        import torch.nn.functional as F
        ids, y = batch
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            logits = self.model(ids)
        return F.cross_entropy(logits.float(), y)

    def evaluate(self) -> float:
        """Rank 0 evaluates (``metrics.evaluate``) and writes the predictions; every rank gets
        the figures.  Returns the validation loss."""
        from llmosd.train import metrics
        figures = None
        if self.rank == 0:
            s = self.s
            names = metrics.metric_names(self.kind, self.classify, s.get("eval_samples", 0))
            self.raw.eval()
            try:
                figures, preds = metrics.evaluate(
                    self.raw.lm, self.tok, self.val_ex, metrics=names, block_size=s["block_size"],
                    batch_size=s["batch_size"], eval_samples=s.get("eval_samples", 0),
                    device=self.device, amp=self.amp, head=self.raw.score, labels=self.labels,
                    encoded=self.val_enc)
            finally:
                self.raw.train()
            metrics.write_predictions(os.path.join(self.dir, "val_predictions.jsonl"), preds)
        self.figures = self.dist.broadcast_object(figures)
        self.final["metrics"] = dict(self.figures)
        return self.figures["loss"]

    def eval_record(self) -> dict:
        f = self.figures
        out = {"val_ppl": f["perplexity"]}
        out.update({k: v for k, v in f.items() if k not in ("loss", "perplexity")})
        return out
