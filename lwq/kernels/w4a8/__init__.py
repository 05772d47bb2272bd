"""W4A8: per-token int8 quantization and the int8 GEMM (kernel.py, lazy), torch reference, entry point (ops.py)."""
