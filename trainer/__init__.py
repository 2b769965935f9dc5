"""Trainer: BatchNorm networks with trustworthy running statistics (imports torch, never the server)."""
from __future__ import annotations
