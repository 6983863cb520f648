"""The torch half of an engine: a sequence's forward pass and next-token choice, one-shot
evaluations, and the release of the model's memory.  ``engine.py`` is the loop around it.

Contract: every method runs on the engine's own thread (inside ``session()``), and every failure
leaves as an ``LlmosdError`` (``OutOfMemory``, ``Cancelled``, ``InvalidArgument``, ``Internal``),
so the loop needs to know nothing of torch's exceptions.  A sequence runs alone (batch 1), so
its output is bit-identical to a plain forward pass of the same weights.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field

import torch

from llmctl.errors import Cancelled, Internal, LlmosdError, OutOfMemory
import llmosd.serve.evaluate as evaluate
from llmosd.models.llama import KVCache, Llama
from llmosd.serve.request import Call, SamplingParams, invalid_argument
from llmosd.serve.sampling import make_generator, sample, top_logprobs
from llmosd.serve.scheduler import kv_position_bytes

log = logging.getLogger("llmosd.engine")


@dataclass
class Sampled:
    """One step's result: the chosen token, and with logprobs its log-probability under the
    model and the most likely alternatives as (id, logprob)."""
    token: int
    logprob: float = 0.0
    top: list = field(default_factory=list)


class Runner:
    """A loaded model on its device, run one sequence at a time."""

    def __init__(self, model: Llama, tokenizer, device: torch.device):
        self.model, self.tok, self.device = model, tokenizer, device
        c = model.config
        self.context = c.max_position_embeddings
        self.kv_dtype = model.model.embed_tokens.weight.dtype
        self.kv_position_bytes = kv_position_bytes(c.num_hidden_layers, c.num_key_value_heads,
                                                   c.head_dim, self.kv_dtype.itemsize)
        self.eos_ids = c.eos_ids() | tokenizer.eos_ids()

    def session(self):
        """The context the engine thread runs in: no autograd state is kept."""
        return torch.inference_mode()

    def new_cache(self, positions: int) -> KVCache:
        """A KV cache for ``positions`` positions: (layers) x (1, kv_heads, positions, head_dim)."""
        try:
            return KVCache(self.model.config, positions, device=self.device, dtype=self.kv_dtype)
        except torch.OutOfMemoryError:
            raise OutOfMemory("no memory for this request's KV cache") from None

    @staticmethod
    def new_generator(seed: int | None) -> torch.Generator:
        return make_generator(seed)

    def step(self, cache: KVCache, ids: list[int], pos: int, sampling: SamplingParams,
             generator: torch.Generator, history: list[int], logprobs: int = 0) -> Sampled:
        """Feed ``ids`` (the whole prompt at ``pos`` 0 for a prefill, the last token for a
        decode) into ``cache`` and choose the next token.  ``history``: prompt and output ids
        so far, for the repetition penalty."""
        try:
            x = torch.tensor([ids], device=self.device)                    # (1, T)
            logits = self.model(x, cache, pos, last_only=True)[0, -1]      # (V,) float32
            seen = (torch.tensor(history, device=self.device)
                    if sampling.repetition_penalty != 1.0 else None)
            token = sample(logits, sampling, generator, seen)
            if not logprobs:
                return Sampled(token)
            lp, top = top_logprobs(logits, token, logprobs)
            return Sampled(token, lp, top)
        except torch.OutOfMemoryError:
            raise OutOfMemory("ran out of memory while generating") from None
        except Exception as e:
            log.exception("forward pass failed")
            raise Internal(f"forward pass failed: {e}") from None

    def call(self, call: Call, should_stop) -> dict:
        """Run ``evaluate.<call.name>``; ``should_stop()`` true abandons it (Cancelled)."""
        try:
            return evaluate.FUNCTIONS[call.name](self.model, self.tok, self.device,
                                                 should_stop=should_stop, **call.args)
        except evaluate.Stopped:
            raise Cancelled(f"the instance stopped during {call.name}") from None
        except ValueError as e:
            raise invalid_argument(e) from None
        except torch.OutOfMemoryError:
            raise OutOfMemory(f"ran out of memory during {call.name}") from None
        except LlmosdError:
            raise
        except Exception as e:
            log.exception("%s failed", call.name)
            raise Internal(f"{call.name} failed: {e}") from None

    def close(self) -> None:
        """Drop the model and give its memory back (on the engine thread, never the loop's):
        a collection frees the tensors now, and on CUDA the caching allocator's blocks return
        to the device for the next load."""
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
