"""Issue 13: the paged KV cache's block manager (pure, no torch): allocation, growth, return
to the pool, prefix sharing by hash chains of full computed blocks."""
import subprocess
import sys

import pytest

from llmosd.serve.blocks import BlockManager


def check(bm: BlockManager) -> None:
    """Ref counts equal the tables holding each block; free and used partition the pool."""
    held = {}
    for key in list(bm._tables):
        table = bm.table(key)
        assert len(set(table)) == len(table)
        for b in table:
            held[b] = held.get(b, 0) + 1
    for b in range(bm.num_blocks):
        assert bm.ref[b] == held.get(b, 0)
        assert (b in bm._free) == (bm.ref[b] == 0)
    assert bm.free_count + bm.used_count == bm.num_blocks


def test_i13_2_blocks_grow_as_needed_and_all_return_to_the_pool():
    bm = BlockManager(8, 4)
    assert bm.blocks_needed(0) == 0 and bm.blocks_needed(4) == 1 and bm.blocks_needed(5) == 2
    toks = [1, 2, 3, 4, 5]
    assert bm.allocate("a", toks) == 0
    assert len(bm.table("a")) == 2 and bm.positions("a") == 8 and "a" in bm
    for t in range(6, 13):                       # grows one block per 4 positions, no reservation
        assert bm.can_append("a")
        toks.append(t)
        bm.append("a", toks)
        assert bm.positions("a") >= len(toks)
    assert len(bm.table("a")) == 3
    bm.allocate("b", [9] * 20)
    check(bm)
    assert bm.free_count == 0 and not bm.can_append("a")
    with pytest.raises(ValueError):
        bm.append("a", toks + [13])
    assert not bm.can_allocate([1])
    bm.free("a")
    bm.free("b")
    bm.free("b")                                 # already gone: a no-op, never a double free
    check(bm)
    assert bm.free_count == 8 and bm.used_count == 0 and "a" not in bm and bm.table("a") == []


def test_i13_2_prefix_sharing_shares_full_computed_blocks():
    bm = BlockManager(10, 4)
    system = [7, 7, 1, 2, 3, 4, 5, 6]            # two full blocks
    assert bm.allocate("a", system + [10, 11]) == 0
    assert bm.allocate("x", system + [10]) == 0  # a's KV is not computed yet: nothing shared
    bm.free("x")
    bm.commit("a", system + [10, 11], 10)        # a's prefill ran
    assert bm.can_allocate(system + [20, 21])
    assert bm.allocate("b", system + [20, 21]) == 8
    assert bm.table("b")[:2] == bm.table("a")[:2] and bm.table("b")[2] != bm.table("a")[2]
    assert bm.ref[bm.table("a")[0]] == 2
    check(bm)
    bm.free("a")
    assert bm.ref[bm.table("b")[0]] == 1         # still held by b
    bm.free("b")
    check(bm)
    assert bm.free_count == 10 and bm.cached_count == 2
    # a later chat with the same system prompt reuses the cached blocks from the free pool
    assert bm.allocate("c", system + [30]) == 8
    # the last token is never served from the cache: the prefill must sample from it
    assert bm.allocate("d", system) == 4
    # a different first block breaks the chain even when the second block matches
    assert bm.allocate("e", [8, 7] + system[2:] + [1]) == 0
    check(bm)


def test_i13_2_cached_block_is_evicted_when_reused():
    bm = BlockManager(3, 2)
    bm.allocate("a", [1, 2, 3])
    bm.commit("a", [1, 2, 3], 3)
    bm.free("a")
    assert bm.cached_count == 1
    bm.allocate("b", [5, 6, 7, 8, 9, 10])        # takes every block, the cached one too
    bm.free("b")
    assert bm.allocate("c", [1, 2, 3]) == 0      # the prefix was overwritten: not shared
    check(bm)


def test_i13_2_append_registers_only_computed_full_blocks():
    bm = BlockManager(6, 2)
    toks = [1, 2, 3]
    bm.allocate("a", toks)
    bm.commit("a", toks, 3)
    toks.append(4)
    bm.append("a", toks)                          # default: all but the newest token computed
    assert bm.allocate("b", [1, 2, 3, 4, 5]) == 2
    toks.append(5)
    bm.append("a", toks)                          # now [3, 4] is computed too
    bm.free("b")
    assert bm.allocate("c", [1, 2, 3, 4, 5]) == 4
    check(bm)


def test_i13_2_blocks_and_scheduler_import_no_torch():
    code = ("import sys, llmosd.serve.blocks, llmosd.serve.scheduler\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
