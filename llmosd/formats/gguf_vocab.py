"""Tokenizers rebuilt from a GGUF file's metadata, as llama.cpp (the format's reference) reads them.

``tokenizer.ggml.model``:
- ``gpt2``: byte-level BPE (vocabulary + merges) -> a ``tokenizers`` BPE with the pre-tokenizer
  regexes llama.cpp uses for the file's ``tokenizer.ggml.pre``; stored as an HFTokenizer bundle.
- ``llama``: SentencePiece-style (pieces, scores, types) -> a SentencePiece BPE ModelProto;
  stored as a serialized SentencePiece model, run by the ``sentencepiece`` library.

Token types (GGUF = SentencePiece numbering): 1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte.  Control and user-defined tokens are matched whole in text (chat templates
write ``<|im_start|>`` as text), as llama.cpp and Hugging Face do.
"""
from __future__ import annotations

import json

from llmosd.formats.common import CheckpointError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (regexes applied in turn, ignore_merges), after llama.cpp's llama-vocab.cpp
PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {
    **{k: ([_GPT2], False) for k in ("gpt-2", "gpt2", "phi-2", "jina-es", "jina-de",
                                      "jina-v2-es", "jina-v2-de", "jina-v2-code", "roberta-bpe")},
    **{k: ([_LLAMA3], True) for k in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral",
                                       "dbrx", "smaug-bpe")},
    **{k: ([r"\p{N}", _GPT2], False) for k in ("smollm", "starcoder", "refact", "codeshell")},
    **{k: ([_QWEN2], False) for k in ("qwen2", "deepseek-r1-qwen", "megrez")},
}

# Tokens llama.cpp treats as end of generation when the file marks them control.
_END_OF_TURN = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                "<|eom_id|>", "<EOT>", "</s>", "<|end_of_text|>"}


def _ids(meta: dict, key: str) -> int | None:
    """A token id from the metadata; CheckpointError naming the key if it is not one."""
    v = meta.get(f"tokenizer.ggml.{key}")
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
        raise CheckpointError(f"tokenizer.ggml.{key} must be a token id (an integer >= 0), got {v!r:.40}")
    return v


def end_of_generation_ids(meta: dict) -> list[int]:
    """EOS, EOT and EOM ids, plus control tokens spelled like a known end-of-turn marker."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    ids = [i for i in (_ids(meta, "eos_token_id"), _ids(meta, "eot_token_id"),
                       _ids(meta, "eom_token_id")) if i is not None]
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty == CONTROL and tok in _END_OF_TURN and i not in ids:
            ids.append(i)
    return ids


def from_gguf(meta: dict) -> tuple[str, bytes, dict]:
    """(tokenizer type, stored bytes, info) for the tokenizer a GGUF's metadata describes.

    ``info``: bos/eos ids, end-of-generation ids, add_bos, chat_template.  Raises CheckpointError.
    """
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise CheckpointError("the file has no tokenizer (tokenizer.ggml.model/tokens are missing)")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError("tokenizer.ggml.tokens must be an array of strings")
    eog = end_of_generation_ids(meta)
    bos = _ids(meta, "bos_token_id")
    for name, i in (("bos", bos), ("eos", eog[0] if eog else None)):
        if i is not None and not 0 <= i < len(tokens):
            raise CheckpointError(f"tokenizer.ggml.{name}_token_id {i} is outside the vocabulary of {len(tokens)}")
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    info = {"bos_token_id": bos, "eos_token_ids": eog, "chat_template": meta.get("tokenizer.chat_template")}
    if model == "gpt2":
        info["add_bos_token"] = bool(add_bos) if add_bos is not None else False
        return "hf-tokenizers", _byte_level_bpe(meta, info), info
    if model == "llama":
        info["add_bos_token"] = bool(add_bos) if add_bos is not None else True
        return "sentencepiece", _sentencepiece(meta), info
    raise CheckpointError(f"tokenizer type {model!r} (tokenizer.ggml.model) is not supported; "
                          "supported: gpt2 (byte-level BPE), llama (SentencePiece)")


def _byte_level_bpe(meta: dict, info: dict) -> bytes:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise CheckpointError("a gpt2 (byte-level BPE) tokenizer needs tokenizer.ggml.merges, which is missing")
    pre = meta.get("tokenizer.ggml.pre") or "default"
    regexes, ignore_merges = PRE_TOKENIZERS.get(pre, ([_GPT2], False))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise CheckpointError(f"tokenizer.ggml.merges has a malformed entry {m!r}")
        pairs.append((a, b))
    try:
        tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                                  ignore_merges=ignore_merges))
    except Exception as e:
        raise CheckpointError(f"the BPE vocabulary and merges do not fit together: {e}") from None
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == CONTROL and t])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == USER_DEFINED and t])
    if tk.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise CheckpointError(f"the rebuilt tokenizer has {tk.get_vocab_size(with_added_tokens=True)} "
                              f"tokens, the file lists {len(tokens)} (duplicate tokens?)")
    return json.dumps({"tokenizer_json": tk.to_str(), **info}).encode()


def _sentencepiece(meta: dict) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not len(scores) == len(types) == len(tokens):
        raise CheckpointError(f"tokenizer.ggml.tokens/scores/token_type have different lengths "
                              f"({len(tokens)}/{len(scores)}/{len(types)})")
    m = pb.ModelProto()
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE     # llama.cpp's SPM tokenizer merges by piece score = SentencePiece BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = BYTE in types
    unk = _ids(meta, "unknown_token_id")
    if unk is None:
        unk = next((i for i, ty in enumerate(types) if ty == UNKNOWN), None)
    if unk is None:
        raise CheckpointError("a SentencePiece vocabulary needs an unknown token; the file has none")
    if not 0 <= unk < len(tokens):
        raise CheckpointError(f"tokenizer.ggml.unknown_token_id {unk} is outside the vocabulary of {len(tokens)}")
    ts.unk_id, ts.unk_piece = unk, tokens[unk]
    special = {unk: UNKNOWN}
    for key, field in (("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        i = _ids(meta, f"{key}_token_id")
        setattr(ts, f"{field}_id", -1 if i is None else i)
        if i is None:
            continue
        if not 0 <= i < len(tokens):
            raise CheckpointError(f"tokenizer.ggml.{key}_token_id {i} is outside the vocabulary of {len(tokens)}")
        setattr(ts, f"{field}_piece", tokens[i])
        if i != unk:
            special.setdefault(i, CONTROL)
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False))
    ns.escape_whitespaces = True
    seen = set()
    for i, (t, s, ty) in enumerate(zip(tokens, scores, types)):
        p = m.pieces.add()
        ty = special.get(i, ty if ty in (NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL)
        if not t or t in seen:             # SentencePiece needs unique, non-empty pieces
            t, ty = f"<unused_{i}>", UNUSED
        seen.add(t)
        p.piece, p.score, p.type = t, float(s), ty
    data = m.SerializeToString()
    try:
        import sentencepiece as spm
        spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:
        raise CheckpointError(f"the SentencePiece vocabulary is not usable: {e}") from None
    return data
