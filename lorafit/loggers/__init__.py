"""Logger integrations (W&B run naming and config logging).

May import: ``lorafit.errors``, ``lorafit.io``.
"""
