"""Structure of compiled XLA programs, for tests that guard against compile-time regressions
without timing anything."""
from __future__ import annotations


def largest_fusion(hlo_text: str) -> int:
  """Instruction count of the largest fused computation in an optimized HLO module's text
  (`jax.jit(f).lower(...).compile().as_text()`)."""
  sizes, current = {}, None
  for line in hlo_text.splitlines():
    if line.startswith("%") and line.endswith("{"):
      current = line.split()[0]
      sizes[current] = 0
    elif line.startswith("}"):
      current = None
    elif current is not None and " = " in line:
      sizes[current] += 1
  return max((n for name, n in sizes.items() if "fused" in name or "fusion" in name), default=0)
