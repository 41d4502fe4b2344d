"""The one exception type for problems in what the user gave us.

Anything raised as ``LorafitError`` is printed by the CLI as a single ``lorafit: error: ...`` line
(no traceback) and exits with status 2, so messages must name the file or config key at fault and
say what to do about it.
"""


class LorafitError(Exception):
    """Bad user input (path, config key, dataset file); its message is shown as one line."""
