"""The ``lorafit`` command line.

``main.py`` dispatches verbs; ``lightning_cli.py`` is LightningCLI for ``fit``/``validate``;
``arguments.py`` rewrites the spellings users type (repeated list flags, dashes) before parsing.
May import anything in lorafit; nothing in lorafit imports it.
"""

from lorafit.cli.main import main

__all__ = ["main"]
