"""Calibration: text sources and the statistics collected block by block."""
