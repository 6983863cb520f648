"""A training worker's measured memory (its metrics' ``mem_bytes``) is its own, not the
daemon's: Linux carries ``ru_maxrss`` over from the parent across fork and exec."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_i12_review_worker_peak_is_its_own_not_the_parents():
    ballast = bytearray(300 << 20)          # the parent (the daemon) has been big
    ballast[::4096] = b"x" * len(ballast[::4096])
    code = ("import resource; from llmosd.train.pretrain import own_peak_rss; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, own_peak_rss())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout.split()
    inherited, own = int(out[0]), int(out[1])
    assert 0 < own < 200 << 20, own                 # a bare interpreter with llmosd.train imported
    assert inherited >= 300 << 20                   # what ru_maxrss would have said
    del ballast
