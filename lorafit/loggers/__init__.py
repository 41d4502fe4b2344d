"""Logger integrations: W&B run naming (``wandb.py``) and the run config logged once, truthfully
(``run_config.py``).

May import: ``lorafit.errors``, ``lorafit.io``.
"""
