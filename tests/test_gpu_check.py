"""`bench/gpu_check.sh` on a host without CUDA: the labelled CPU fallback, run to the end.

The script is what a GPU host runs (see bench/README.md); here it must not pass a CPU
number off as a GPU one: the fallback label at the top and in the summary, the gpu tests
skipped, and `bench/bench_train.py` on the CPU with its ratio line against the bare loop.
Tiny sizes (`--quick`): about a minute on an idle 2-core machine, most of it Ray start-up.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FALLBACK = "CPU FALLBACK: not a GPU result"


@pytest.mark.slow
@pytest.mark.timeout(1500)  # ~1 min idle; a loaded 2-core machine took 15 min for the Ray part
@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA: no fallback to check")
def test_gpu_check_falls_back_to_cpu_with_labels(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "GPU_CHECK_BUDGET_S": "1300"}  # the 8-minute budget is the GPU host's
    env.pop("GPU_CHECK_QUICK", None)
    res = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--quick"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=1400)
    out = res.stdout
    assert res.returncode == 0, f"exit {res.returncode}\n{out[-4000:]}\n{res.stderr[-3000:]}"
    assert FALLBACK in "\n".join(out.splitlines()[:6]), out[:1000]  # said at the top
    assert "already importable: not installing" in out  # this venv has ray and pytest
    summary = out[out.rindex("\n", 0, out.index("GPU CHECK SUMMARY")) + 1:]  # its whole first line
    assert summary.count(FALLBACK) == 2, summary  # the label line and the closing line
    assert re.search(r"gpu tests: 2 skipped", summary), summary
    ratio = re.search(r"ray (\S+) samples/s vs bare (\S+) samples/s: ratio ray/bare (\d+\.\d{3})",
                      summary)
    assert ratio, summary
    ray_rate, bare_rate = (float(ratio.group(i).replace(",", "")) for i in (1, 2))
    assert ray_rate > 0 and bare_rate > 0
    result = json.loads((tmp_path / "out" / "bench_train.json").read_text())
    assert result["device"] == "cpu" and result["bf16"] is False
    assert result["ratio"] == pytest.approx(ray_rate / bare_rate, rel=0.01, abs=1e-3)
    assert (tmp_path / "out" / "summary.txt").read_text().strip() == summary.strip()
