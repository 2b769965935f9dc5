"""foldserve: train BatchNorm networks, fold BN into their neighbours, verify, and serve over KServe v2.

This small package holds what every stage shares and that imports nothing heavy: the version, the error
hierarchy, atomic file writes and the ``foldserve`` command line.
"""
from __future__ import annotations

__version__ = "0.1.0"
