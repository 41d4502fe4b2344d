"""Plumbing that knows nothing of Lightning or diffusion: atomic file writes (``atomic.py``), optional
packages kept unimportable until asked for (``optional_imports.py``), the run-folder lock
(``run_lock.py``), the resume-checkpoint check (``checkpoint_file.py``) and failed writes as one line
(``write_errors.py``).

May import: ``lorafit.errors`` only. Imports no torch at module level (the caption tools use it).
"""
