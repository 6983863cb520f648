"""Tokenizers behind one small interface (encode, decode, special ids, piece count).

``SentencePieceTokenizer`` wraps a serialized SentencePiece model (the store keeps its bytes).
``train_sentencepiece`` builds one from text: BPE or unigram with byte fallback, so any input
encodes and no character is lost, or one piece per character; newline is a piece of its own so
generated text keeps its lines.
"""
from __future__ import annotations

import io
import json
import re

import sentencepiece as spm


class SentencePieceTokenizer:
    """A SentencePiece model.  Control pieces written in the text (``<s>``, ``</s>``, chat
    markers) encode to their ids, as Hugging Face and llama.cpp do, so chat templates work."""

    kind = "sentencepiece"

    def __init__(self, model_bytes: bytes, add_bos: bool = True, chat_template: str | None = None):
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.vocab_size = self.sp.get_piece_size()
        self.add_bos, self.chat_template = add_bos, chat_template
        self._special = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                         if self.sp.is_control(i) and self.sp.id_to_piece(i)}
        self._split = (re.compile("(" + "|".join(map(re.escape, sorted(self._special, key=len, reverse=True))) + ")")
                       if self._special else None)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.bos_id] if add_bos and self.add_bos and self.bos_id is not None else []
        for i, part in enumerate(self._split.split(text) if self._split else [text]):
            if i % 2:
                ids.append(self._special[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def token(self, i: int | None) -> str | None:
        return self.sp.id_to_piece(i) if i is not None else None

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def eos_ids(self) -> set[int]:
        return {self.eos_id} if self.eos_id is not None else set()


def train_sentencepiece(text: str, vocab_size: int, seed: int = 0, model_type: str = "bpe") -> bytes:
    """Train a SentencePiece model on ``text``; returns the serialized model.

    ``model_type`` "bpe" or "unigram": byte fallback, so any input encodes; the vocabulary is at
    most ``vocab_size`` (smaller if the text is too small to fill it).  "char": one piece per
    character of the text (``vocab_size`` is not used) and no byte pieces, as classic
    character-level baselines count them; unseen characters encode to ``<unk>``.
    Raises ValueError when the text is empty or the size is impossible.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("the vocabulary text is empty")
    char = model_type == "char"
    if char:
        vocab_size = len(set(text)) + 8          # every character; hard_vocab_limit=False trims
    elif vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small: 256 byte pieces, 3 specials and "
                         "the text's characters need at least 300")
    out = io.BytesIO()
    spm.set_random_generator_seed(seed or 1)   # training shuffles: make it reproducible
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=not char, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
        hard_vocab_limit=False, input_sentence_size=2_000_000, shuffle_input_sentence=True,
        num_threads=1, minloglevel=2, add_dummy_prefix=not char,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    return out.getvalue()


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (byte-level BPE and friends) plus the special ids
    and chat template from its ``tokenizer_config.json``, stored together as one JSON bundle."""

    kind = "hf-tokenizers"

    def __init__(self, bundle: bytes, add_bos: bool | None = None, chat_template: str | None = None):
        from tokenizers import Tokenizer
        b = json.loads(bundle)
        self.tk = Tokenizer.from_str(b["tokenizer_json"])
        self.bos_id = b.get("bos_token_id")
        self.eos_id = (b.get("eos_token_ids") or [None])[0]
        self._eos = set(b.get("eos_token_ids") or [])
        self.add_bos = bool(b.get("add_bos_token", False)) if add_bos is None else add_bos
        self.chat_template = chat_template or b.get("chat_template")
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def token(self, i: int | None) -> str | None:
        return self.tk.id_to_token(i) if i is not None else None

    def eos_ids(self) -> set[int]:
        return set(self._eos)


def hf_bundle(tokenizer_json: str, tokenizer_config: dict, model_config: dict) -> bytes:
    """Build the HFTokenizer bundle from a HF directory's files."""
    from tokenizers import Tokenizer
    tk = Tokenizer.from_str(tokenizer_json)

    def tid(tok):
        if isinstance(tok, dict):
            tok = tok.get("content")
        return tk.token_to_id(tok) if isinstance(tok, str) else None
    bos = tid(tokenizer_config.get("bos_token"))
    if bos is None:
        bos = model_config.get("bos_token_id")
    eos = model_config.get("eos_token_id")
    eos = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
    cfg_eos = tid(tokenizer_config.get("eos_token"))
    if cfg_eos is not None and cfg_eos not in eos:
        eos.append(cfg_eos)
    # As transformers does: tokenizer_config's add_bos_token if given, else whatever the
    # tokenizer's own post-processor does with special tokens.
    add_bos = tokenizer_config.get("add_bos_token")
    if add_bos is None:
        add_bos = bos is not None and tk.encode("a", add_special_tokens=True).ids[:1] == [bos]
    return json.dumps({"tokenizer_json": tokenizer_json, "bos_token_id": bos, "eos_token_ids": eos,
                       "add_bos_token": bool(add_bos),
                       "chat_template": tokenizer_config.get("chat_template")}).encode()
