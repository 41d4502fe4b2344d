"""The ``lorafit`` command line.

``main.py`` dispatches verbs; ``startup.py`` keeps library start-up noise away; ``lightning_cli.py``
is LightningCLI for ``fit``/``validate``, with ``trainer_setup.py`` (the trainer fitted to the flags
set), ``run_config.py`` (config.yaml and the loggers' copy) and ``run_folder.py`` (a refused start
leaves the run folder as it was); ``arguments.py`` rewrites the spellings users type (repeated list
flags, dashes) before parsing; ``suggestions.py`` turns parser errors into ones a user can act on.
May import anything in lorafit; nothing in lorafit imports it.
"""

from lorafit.cli.main import main

__all__ = ["main"]
