"""Plumbing that knows nothing of Lightning or diffusion: atomic file writes (``atomic.py``).

May import: ``lorafit.errors`` only. Imports no torch at module level (the caption tools use it).
"""
