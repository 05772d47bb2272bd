"""lwq's benchmarks: each module prints a table and writes JSON under ``benchmarks/out/``.

Run one as ``python -m benchmarks.NAME`` from the project root, or as ``python benchmarks/NAME.py``
from anywhere: a script run as a file puts the project root, never ``benchmarks/``, at the head of
``sys.path``, so no benchmark module can shadow an installed package (``tests/test_shadowing.py``).
"""
