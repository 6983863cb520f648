"""Issue 13, bench B8 (the daemon's RSS): the KV pool's lazily committed pages are not made huge
pages by numpy (each first write to a block would commit 2 MiB), the variable that turns that
off is not passed on to job workers, and a load hands malloc's free pages back (``malloc_trim``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmosd.models import loader
from llmosd.store.store import Store
from test_i13_b5_load import tiny_manifest        # a small created model in a store


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "store"))

POOL = r"""
import os, sys
from llmosd.main import import_numpy_without_hugepages
import_numpy_without_hugepages()                     # as the daemon does, before torch
import torch
from llmosd.models.llama import lazy_zeros
t = lazy_zeros((64 << 20,), "cpu", torch.uint8)       # 64 MiB, committed as written
t[8 << 20] = 1                                       # one byte of one block
addr, flags = t.data_ptr() + (8 << 20), None
for line in open("/proc/self/smaps"):
    if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        mine = lo <= addr < hi
    elif line.startswith("VmFlags:") and mine:
        flags = line.split()[1:]
print("hg" in flags, os.environ.get("NUMPY_MADVISE_HUGEPAGE"))
"""


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only")
def test_i13_b8_kv_pool_pages_are_not_huge_pages():
    """No MADV_HUGEPAGE on the pool ("hg" in its mapping's VmFlags): where transparent huge
    pages are "madvise" (the common default), the first write to a block would commit 2 MiB
    (8 clients x 64 tokens: 152 MiB of pool RSS instead of 30)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    r = subprocess.run([sys.executable, "-c", POOL], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    advised, passed_on = r.stdout.split()
    assert advised == "False"
    assert passed_on == "None"                        # job workers start with numpy's default


def test_i13_b8_load_releases_free_heap(store, monkeypatch):
    calls = []

    class FakeLibc:
        def malloc_trim(self, pad):
            calls.append(pad)
            return 1
    monkeypatch.setattr(loader, "_LIBC", FakeLibc())
    man, _ = tiny_manifest(store)
    loader.load_model(store, man, torch.device("cpu"))
    assert calls == [0]


def test_i13_b8_release_free_heap_works_without_glibc(monkeypatch):
    monkeypatch.setattr(loader, "_LIBC", None)
    loader.release_free_heap()                        # nothing to do, no error
