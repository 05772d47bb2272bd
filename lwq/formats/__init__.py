"""Packed formats, ``QuantizedLinear``, checkpoint read/write and export."""
