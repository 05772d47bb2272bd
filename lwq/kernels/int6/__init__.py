"""INT6 (W6A16, W6A8): the w4a16/w4a8 kernels with ``BITS=6`` (ops.py) and their torch reference."""
