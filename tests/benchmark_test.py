"""The benchmark's quick mode runs end to end (its numbers mean nothing there)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _benchmark(*args, timeout):
    return subprocess.run([sys.executable, "-m", "benchmarks.benchmark", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # About a minute: in CI's slow pass.
def test_benchmark_quick_writes_every_key(tmp_path):
    out = _benchmark(f"--out={tmp_path}", "--quick", "--sections=import,step,vmap8,iwae",
                     timeout=600)
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "benchmark.json").read_text())
    for key in ("train_step_vs_matmul", "iwae5000_peak_rss_gb", "iwae5000_vs_matmul",
                "vmap8_vs_1", "import_s", "compile_s", "vaekl_step_s", "matmul_chain_step_s"):
        assert key in res, key
    for key in ("train_step_vs_matmul", "vmap8_vs_1", "iwae5000_vs_matmul"):
        assert res[key] > 0
    assert 0 < res["iwae5000_peak_rss_gb"] < 100
    assert "torch_eager_step_s" not in res  # 'torch' was not among the sections.
    assert "train_step_vs_matmul" in (tmp_path / "benchmark.md").read_text()


def test_an_unknown_section_is_one_error_naming_the_flag(tmp_path):
    out = _benchmark(f"--out={tmp_path}", "--sections=step,kl", timeout=120)
    assert out.returncode != 0
    assert "--sections" in out.stderr and "'kl'" in out.stderr
    assert not (tmp_path / "benchmark.json").exists()


def test_a_fresh_process_reports_its_own_peak_memory_not_its_parents():
    hog = np.ones(250_000_000, np.float32)  # 1 GB resident in this (the parent) process.
    out = subprocess.run([sys.executable, "-c", "from benchmarks.benchmark import peak_rss_gb;"
                          " print(peak_rss_gb())"], cwd=REPO, check=True, capture_output=True,
                         text=True, timeout=120)
    assert hog.sum() > 0 and float(out.stdout) < 0.5


@pytest.mark.slow  # About 3 minutes (torch.compile of three steps): in CI's slow pass.
def test_benchmark_burda_section_quick(tmp_path):
    pytest.importorskip("torch")
    out = _benchmark(f"--out={tmp_path}", "--quick", "--sections=burda", timeout=1200)
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "benchmark.json").read_text())["burda"]
    assert set(res) == {"k1", "k5", "k50"}
    for case in res.values():
        for key in ("vs_torch", "vs_torch_compile", "vs_limit", "vs_matmul_chain"):
            assert case[key] > 0, key
        # The limit does what the matmul chain does and an Adam update besides.
        assert case["limit_step_s"]["median"] > 0 and case["matmul_chain_step_s"]["median"] > 0
    assert res["k1"]["seeds3_seed_steps_per_s"] > 0
    table = (tmp_path / "benchmark.md").read_text()
    assert "| k50 |" in table and "vs matmul+Adam limit" in table
