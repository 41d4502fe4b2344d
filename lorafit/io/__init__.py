"""Plumbing that knows nothing of Lightning or diffusion: atomic file writes (``atomic.py``), optional
packages kept unimportable until asked for (``optional_imports.py``).

May import: ``lorafit.errors`` only. Imports no torch at module level (the caption tools use it).
"""
