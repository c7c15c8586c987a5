"""`keep_freed_memory`: a training loop's large temporaries stop costing page faults every step.

Each case runs in a fresh interpreter: the setting is process-wide and would leak into the
other tests. The oracle is the kernel's own count of minor page faults (`getrusage`).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mpiml.heap import glibc

# A 4096 x 4096 layer: its weight gradient (64 MiB) is above glibc's largest mmap threshold
# (32 MiB), so with glibc's defaults it is mapped and unmapped afresh every step.
LOOP = """
import json, resource, sys, torch
from mpiml.heap import keep_freed_memory
torch.set_num_threads(1)
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
model = torch.nn.Linear(4096, 4096)
x = torch.randn(4, 4096)
faults = []
for _ in range(int(sys.argv[2])):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x).square().mean().backward()
    model.weight.grad = None  # autograd allocates a fresh gradient next step
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""

PAGES_64_MIB = (64 << 20) // 4096


def run_loop(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOOP, mode, "24"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(glibc() is None, reason="only glibc's malloc is tuned")
def test_kept_memory_is_reused_without_page_faults():
    default, kept = run_loop("default"), run_loop("keep")
    assert kept["kept"] and not default["kept"]
    # glibc's defaults: the gradient's pages are faulted in again every step.
    assert min(default["faults"][4:]) >= PAGES_64_MIB // 2, default
    # Kept: the steps reuse the heap. While its free blocks settle, a step now and then still
    # grows it by one gradient (two in 20 steps at most, seen here): far from every step.
    assert sum(kept["faults"][4:]) < sum(default["faults"][4:]) // 4, kept
