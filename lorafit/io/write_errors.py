"""A write that failed for a reason of the machine, not of lorafit: one line instead of a traceback.

A full disk, a used-up quota, the file-size limit (``ulimit -f``), a read-only or foreign-owned
folder: torch, safetensors, Pillow and Lightning each report these their own way, several levels
deep (torch turns the ``OSError`` of a checkpoint write into ``RuntimeError: PytorchStreamWriter
failed writing file``, with the ``OSError`` only as its context; safetensors writes ``I/O error:
No space left on device (os error 28)``). :func:`write_failure` finds the operating system's reason
in any of them, so the CLI can say in one line what happened and what to do. What was written
before is intact: every file lorafit writes goes to a temporary name first (lorafit.io.atomic).
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from lorafit.errors import LorafitError

# errno -> what to do about it.
_HINTS = {
    errno.ENOSPC: "free some space there or choose another folder",
    errno.EDQUOT: "free some of your quota or choose another folder",
    errno.EFBIG: "raise the file-size limit (ulimit -f) or choose another folder",
    errno.EROFS: "choose a writable folder",
    errno.EACCES: "choose a writable folder",
    errno.EPERM: "choose a writable folder",
}
# Permission errors also come from reading inputs; those are only ours when the file is in the folder.
_ONLY_INSIDE = (errno.EACCES, errno.EPERM)
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def write_failure(error: BaseException, folder: str | os.PathLike) -> tuple[int, str | None] | None:
    """``(errno, file or None)`` when ``error`` (or what caused it) is a failed write into ``folder``."""
    folder = Path(folder).resolve()
    for link in _chain(error):
        if isinstance(link, OSError) and link.errno in _HINTS:
            name = link.filename
            inside = name is not None and Path(os.fspath(name)).resolve().is_relative_to(folder)
            if link.errno in _ONLY_INSIDE and not inside:
                continue
            return link.errno, (str(name) if name is not None else None)
        match = _OS_ERROR_IN_TEXT.search(str(link))
        if match and int(match.group(1)) in _HINTS and int(match.group(1)) not in _ONLY_INSIDE:
            return int(match.group(1)), None
    return None


RESUMABLE = (
    "the files already there are complete, as lorafit writes each to a temporary name first, so the run "
    "can resume from its last checkpoint"
)


def one_line_write_error(
    error: BaseException, folder: str | os.PathLike, key: str, consequence: str = RESUMABLE
) -> LorafitError | None:
    """The one-line error for a failed write into ``folder`` (named by option ``key``), else None.

    ``consequence`` says what state the folder is left in and what to do next (default: training's).
    """
    found = write_failure(error, folder)
    if found is None:
        return None
    code, name = found
    where = f"{name} in {folder}" if name else f"a file in {folder}"
    return LorafitError(f"cannot write {where} ({os.strerror(code)}): {_HINTS[code]} (--{key}); {consequence}")
