"""The paged KV cache's bookkeeping: which blocks of an instance's pool each sequence holds.
Pure logic, no torch (the runner owns the tensors; a block id indexes its pool).

A sequence's *table* lists its block ids in order; position ``p`` of the sequence lives in
block ``table[p // block_size]`` at offset ``p % block_size``.  Blocks are handed out as
sequences grow and come back when they end; nothing reserves a maximum length.

Prefix sharing (nano-vllm's BlockManager is the model): a block that is full and whose KV has
been computed is registered under the hash of its tokens chained with the hashes of every
block before it, so equal hashes mean equal prefixes.  A new sequence whose leading full
blocks match registered ones shares them (ref counts) instead of computing them again.  A
freed block keeps its registration while it sits in the free pool, so a prefix (a system
prompt) is still reused after the chat that computed it has ended; the pool hands out the
least recently freed block first, which is when such a registration is dropped.

Equal tokens do not always mean equal KV: a LoRA adapter changes the keys and values.  So a
sequence has a *salt* (``adapter_salt``: a digest of its adapter's key, empty for the base
model) that seeds its hash chain, and blocks are shared only between sequences of one salt.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Hashable


def chain_hash(tokens, prev: bytes = b"") -> bytes:
    """The hash of a full block of ``tokens`` after the block whose hash is ``prev``."""
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def adapter_salt(adapter) -> bytes:
    """The hash-chain seed of a sequence run with ``adapter`` (a stable key, e.g. a manifest
    digest); ``b""`` for the base model (None)."""
    if adapter is None:
        return b""
    return hashlib.blake2b(repr(adapter).encode(), digest_size=16, person=b"llmosd-adapter").digest()


class BlockManager:
    """Blocks of one pool of ``num_blocks`` blocks of ``block_size`` positions.  One thread."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs at least one block of at least one position, "
                             f"got {num_blocks} blocks of {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks                     # sequences holding each block
        self.hash: list[bytes | None] = [None] * num_blocks
        self.content: list[tuple | None] = [None] * num_blocks   # tokens of a registered block
        self.cached: dict[bytes, int] = {}              # hash -> block id (prefix cache)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._tables: dict[Hashable, list[int]] = {}
        self._hashed: dict[Hashable, int] = {}          # leading blocks of a table registered
        self._positions: dict[Hashable, int] = {}       # positions a table was last sized for
        self._salts: dict[Hashable, bytes] = {}         # the seed of each table's hash chain

    # -- counts -----------------------------------------------------------------------------
    @property
    def free_count(self) -> int:
        """Blocks a sequence can take now (cached-but-free blocks included)."""
        return len(self._free)

    @property
    def used_count(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def cached_count(self) -> int:
        """Free blocks that still hold a reusable registered prefix."""
        return sum(1 for b in self._free if self.hash[b] is not None
                   and self.cached.get(self.hash[b]) == b)

    def blocks_needed(self, n_positions: int) -> int:
        return -(-max(0, n_positions) // self.block_size)

    def __contains__(self, key) -> bool:
        return key in self._tables

    def positions(self, key) -> int:
        """Positions ``key``'s table covers (0 when it holds no blocks)."""
        return len(self._tables.get(key, ())) * self.block_size

    def table(self, key) -> list[int]:
        """Block ids of ``key`` in order (a copy; empty when it holds none)."""
        return list(self._tables.get(key, ()))

    # -- allocation ---------------------------------------------------------------------------
    def _prefix_hits(self, tokens: list[int], salt: bytes = b"") -> list[int]:
        """Registered blocks matching the leading full blocks of ``tokens`` under ``salt``,
        never the block of the last token (the prefill must compute at least that one to
        sample from it)."""
        bs, hits, h = self.block_size, [], salt
        for i in range((len(tokens) - 1) // bs):
            part = tuple(tokens[i * bs:(i + 1) * bs])
            h = chain_hash(part, h)
            b = self.cached.get(h)
            if b is None or self.content[b] != part:
                break
            hits.append(b)
        return hits

    def can_allocate(self, tokens: list[int], salt: bytes = b"") -> bool:
        """Whether ``allocate`` of ``tokens`` would succeed now (shared in-use blocks cost none)."""
        hits = self._prefix_hits(tokens, salt)
        new = self.blocks_needed(len(tokens)) - sum(1 for b in hits if self.ref[b] > 0)
        return new <= len(self._free)

    def _take(self) -> int:
        b, _ = self._free.popitem(last=False)           # least recently freed first
        if self.hash[b] is not None:                    # its registration goes with its content
            if self.cached.get(self.hash[b]) == b:
                del self.cached[self.hash[b]]
            self.hash[b] = self.content[b] = None
        self.ref[b] = 1
        return b

    def allocate(self, key, tokens: list[int], salt: bytes = b"") -> int:
        """Give ``key`` (holding nothing) a table for all of ``tokens``; returns how many leading
        tokens already have their KV in shared blocks (a multiple of block_size, < len(tokens)).
        ``salt`` (``adapter_salt``): only blocks registered under the same salt are shared, and
        this table's blocks register under it.  Raises ValueError when the pool cannot hold it
        now (check ``can_allocate``)."""
        if key in self._tables:
            raise ValueError(f"sequence {key!r} already holds blocks")
        if not tokens:
            raise ValueError("a sequence needs at least one token")
        if not self.can_allocate(tokens, salt):
            raise ValueError(f"{self.blocks_needed(len(tokens))} blocks do not fit the "
                             f"{len(self._free)} free")
        hits = self._prefix_hits(tokens, salt)
        for b in hits:
            if self.ref[b] == 0:
                del self._free[b]
            self.ref[b] += 1
        table = hits + [self._take() for _ in range(self.blocks_needed(len(tokens)) - len(hits))]
        self._tables[key], self._hashed[key] = table, len(hits)
        self._positions[key], self._salts[key] = len(tokens), salt
        return len(hits) * self.block_size

    def can_append(self, key) -> bool:
        """Room for one more position: ``key`` has a free slot in its table or a block is free.
        (Counts positions from the tokens last passed to allocate/append.)"""
        return self._room(key) > 0 or bool(self._free)

    def _room(self, key) -> int:
        return len(self._tables[key]) * self.block_size - self._positions[key]

    def append(self, key, tokens: list[int], computed: int | None = None) -> None:
        """``tokens`` grew (a token was added): make the table cover ``len(tokens)`` positions
        (a new block when it is full; ValueError when none is free) and register the full blocks
        within ``tokens[:computed]`` (default: all but the last token, whose KV the next step
        computes)."""
        table = self._tables[key]
        need = self.blocks_needed(len(tokens)) - len(table)
        if need > len(self._free):
            raise ValueError(f"no free block for sequence {key!r}")
        table.extend(self._take() for _ in range(max(0, need)))
        self._positions[key] = len(tokens)
        self.commit(key, tokens, len(tokens) - 1 if computed is None else computed)

    def commit(self, key, tokens: list[int], computed: int) -> None:
        """The KV of ``tokens[:computed]`` is in the cache: register its full blocks."""
        table = self._tables.get(key)
        if table is None:
            return
        bs, done = self.block_size, self._hashed[key]
        full = min(max(0, computed), len(tokens)) // bs
        if full <= done:
            return
        h = self.hash[table[done - 1]] if done else self._salts[key]
        for i in range(done, min(full, len(table))):
            b = table[i]
            part = tuple(tokens[i * bs:(i + 1) * bs])
            h = chain_hash(part, h)
            if self.hash[b] is None:
                self.hash[b], self.content[b] = h, part
                self.cached.setdefault(h, b)        # an equal block computed twice: keep the first
            elif self.hash[b] != h:                 # cannot happen: blocks are written once
                raise AssertionError(f"block {b} changed content")
            done = i + 1
        self._hashed[key] = done

    def free(self, key) -> None:
        """``key`` ends: its blocks' ref counts go down; unreferenced blocks return to the pool
        (last block first, so a prefix's head outlives its tail in the cache)."""
        table = self._tables.pop(key, None)
        self._hashed.pop(key, None)
        self._positions.pop(key, None)
        self._salts.pop(key, None)
        for b in reversed(table or ()):
            if self.ref[b] <= 0:
                raise AssertionError(f"block {b} freed twice")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self._free[b] = None
