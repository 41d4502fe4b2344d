"""Model families: how each base model is loaded, conditioned, noised and named.

One module per family (``sd.py`` for SD1.x/SD2.x, ``sdxl.py``, ``flux.py``, ...) plus the
registry (``registry.py``) that detects a family from a model and hands out its
:class:`~lorafit.families.family.Family` object. Shared pieces: loading (``loading.py``), CLIP text
encoding (``clip_text.py``), the original (SGM/LDM) checkpoint layouts and the check that a single file
filled every weight (``single_file_weights.py``), tiny random-weight pipelines.
May import: ``lorafit.errors``, ``lorafit.io``. Never training, callbacks or the CLI.
"""
