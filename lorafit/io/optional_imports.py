"""Keep an installed optional package unimportable until lorafit asks for it.

diffusers, PEFT and transformers import bitsandbytes at their own import time whenever it is
installed; its import logs warnings on some CPUs (a kernel fetched from the Hugging Face Hub) and
costs about a second, on every ``lorafit`` verb, ``--help`` included, although only the 8-bit
optimizers (and a quantized base) use it. ``sys.modules[name] = None`` is Python's documented way
to block an import: ``import name`` raises ImportError and ``importlib.util.find_spec(name)``, the
check those libraries make, returns None. The CLI blocks at start-up; the code that needs the
package lifts the block right before importing it.
"""

from __future__ import annotations

import sys

BITSANDBYTES = "bitsandbytes"


def block_import(name: str) -> None:
    """Make ``import name`` fail as if ``name`` were not installed; nothing changes if it is imported already."""
    sys.modules.setdefault(name, None)


def allow_import(name: str) -> None:
    """Lift :func:`block_import`'s block, so the next ``import name`` loads the package."""
    if name in sys.modules and sys.modules[name] is None:
        del sys.modules[name]


def import_blocked(name: str) -> bool:
    """Whether :func:`block_import` currently hides ``name``."""
    return name in sys.modules and sys.modules[name] is None
