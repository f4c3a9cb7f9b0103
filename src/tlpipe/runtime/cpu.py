"""What this CPU computes natively: read from /proc/cpuinfo, for compute.precision's advice."""

from __future__ import annotations

from pathlib import Path

# CPU flags of native bfloat16 arithmetic (Intel/AMD AVX-512 BF16, Intel AMX). Without them TensorFlow
# emulates bfloat16, several times slower than float32 (docs/benchmarks.md).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def native_bfloat16(cpuinfo: Path | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (`cpuinfo`'s flags list one of BF16_CPU_FLAGS);
    False where there is no /proc/cpuinfo to read."""
    try:
        text = (cpuinfo or CPUINFO).read_text(errors="replace")
    except OSError:
        return False
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.partition(":")[2].split()}
    return bool(flags & set(BF16_CPU_FLAGS))
