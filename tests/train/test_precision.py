"""precision="auto": bf16 only where the process may use the CPU's bf16 matrix instructions, else fp32."""

import json
import os
import subprocess
import sys

import pytest

from cnnkit.train.precision import onednn_isa_cap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = ("import json, torch; from cnnkit.train.precision import cpu_has_bf16, resolve_precision; "
         "from cnnkit.train.optim import orthogonalize; "
         "print(json.dumps([cpu_has_bf16(), str(resolve_precision('auto', torch.device('cpu'))), "
         "str(orthogonalize(torch.randn(8, 27)).dtype)]))")


def probe(**env: str) -> list:
    """cpu_has_bf16(), precision auto's dtype and the dtype of Muon's Newton-Schulz iteration in a fresh process with ``env`` added (the caps are read by
    oneDNN and ATen when they start)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                                                               "ATEN_CPU_CAPABILITY")}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**clean, "PYTHONPATH": ROOT, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_capped_to_avx2_auto_is_fp32_even_on_a_bf16_cpu():
    # As on an AVX2-only CPU: oneDNN would emulate bf16 (this project's Zen 4: 0.6 GFLOP/s against 60 in fp32).
    # Muon's Newton-Schulz iteration too runs in fp32 there (in emulated bf16 it took 18x the CPU time).
    assert probe(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2") == [False, "None", "torch.float32"]
    assert probe(DNNL_MAX_CPU_ISA="avx512_core") == [False, "None", "torch.float32"]  # AVX-512, no bf16 dots


def test_uncapped_bf16_cpu_trains_in_bf16():
    with open("/proc/cpuinfo") as f:
        if "avx512_bf16" not in f.read():
            pytest.skip("this CPU has no AVX512_BF16")
    assert probe() == [True, "torch.bfloat16", "torch.bfloat16"]
    assert probe(ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16") == [True, "torch.bfloat16", "torch.bfloat16"]


def test_onednn_cap_names_as_onednn_reads_them(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert onednn_isa_cap() is None
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "avx2")
    assert onednn_isa_cap() == "AVX2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")  # the newer name wins
    assert onednn_isa_cap() == "AVX512_CORE_BF16"
