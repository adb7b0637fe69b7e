"""The allocator returns freed blocks of a megabyte and more to the system."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from aiops_plugin.memory import return_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_arrays_leave_the_rss_once_the_threshold_is_fixed() -> None:
    # after one 24 MB array is freed, glibc's moving threshold serves the next ones from the
    # heap, whose freed memory stays in the RSS; fixed, each is mapped and given back
    code = """
import sys, numpy as np
from aiops_plugin.memory import return_freed_memory
if sys.argv[1] == "fixed":
    assert return_freed_memory()
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
big = np.ones(3 * 2**20); del big  # 24 MB: raises a moving threshold to 24 MB
base = rss()
parts, kept = [], []
for _ in range(16):  # 16 x 16 MB, each followed by a small array that stays
    parts.append(np.ones(2**21))
    kept.append(np.ones(1000))
del parts
print((rss() - base) // 1024)
"""
    grown = {
        mode: int(subprocess.check_output([sys.executable, "-c", code, mode], text=True))
        for mode in ("moving", "fixed")
    }
    assert grown["moving"] > 200  # MB kept after the free
    assert grown["fixed"] < 20
    assert return_freed_memory()
