"""Allocation solvers: pure functions ``solve(layers, cap_bytes, **constraints) -> Allocation`` over
cost/error tables (no torch). ``lwq.allocate.SOLVERS`` registers them by name."""
