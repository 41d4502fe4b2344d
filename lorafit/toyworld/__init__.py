"""The offline toy world: coloured shapes, a tiny base model trained on them, a judge classifier.

May import: the lower layers and ``lorafit.inference``.
"""
