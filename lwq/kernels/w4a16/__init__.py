"""W4A16: the weight-only Triton GEMM (kernel.py, imported lazily), its torch reference, its entry point (ops.py)."""
