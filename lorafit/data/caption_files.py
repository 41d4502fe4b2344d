"""Reading caption sidecars in the encodings people's tools actually write.

kohya reads captions as UTF-8 and fails on anything else; lorafit used to skip such a file. But
caption files come from Windows Notepad (UTF-8 with a byte-order mark, or "Unicode", i.e. UTF-16
with one), from older taggers and spreadsheets exporting Windows-1252/Latin-1 (``café`` as the
single byte ``0xE9``), and from PowerShell's ``>`` (UTF-16 LE). Each is decoded here, in this order,
and the encoding is returned so ``lorafit prepare`` can report every file that was not UTF-8:

1. a byte-order mark decides: UTF-8 (BOM dropped), UTF-16 LE/BE;
2. strict UTF-8 (plain ASCII is UTF-8 too);
3. UTF-16 without a mark, when every other byte is zero (ASCII text in UTF-16);
4. a file with NUL bytes or other control characters is not text: refused;
5. Windows-1252 (a superset of Latin-1's printable characters), else Latin-1 (which decodes any byte).

Step 5 is a guess by design: a legacy 8-bit file carries no name of its encoding, and Windows-1252
is what almost all of them are. The report says so, so a user can re-save the file as UTF-8.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path

from lorafit.errors import LorafitError

UTF8 = "utf-8"
UTF8_ENCODINGS = ("utf-8", "utf-8-sig")  # what every trainer reads as is
# Names as the report shows them.
ENCODING_NAMES = {
    "utf-8": "UTF-8",
    "utf-8-sig": "UTF-8 with a byte-order mark",
    "utf-16": "UTF-16",
    "utf-16-le": "UTF-16 LE without a byte-order mark",
    "utf-16-be": "UTF-16 BE without a byte-order mark",
    "cp1252": "Windows-1252 (Latin-1)",
    "latin-1": "Latin-1",
}
# Control characters no caption holds (tab, line feed, form feed, carriage return are text).
_BINARY = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class CaptionFile:
    """A caption sidecar's text and how it was decoded.

    Attributes:
        text: The whole file as text.
        encoding: Python's codec name: ``utf-8``, ``utf-8-sig``, ``utf-16``, ``utf-16-le``,
            ``utf-16-be``, ``cp1252`` or ``latin-1``.
    """

    text: str
    encoding: str

    @property
    def is_utf8(self) -> bool:
        """UTF-8 with or without a byte-order mark: what every trainer reads as is."""
        return self.encoding in UTF8_ENCODINGS

    @property
    def caption(self) -> str | None:
        """The first non-blank line, stripped (kohya's rule; later lines are not read), or None."""
        for line in self.text.splitlines():
            if line.strip():
                return line.strip()
        return None


def _utf16_without_bom(data: bytes) -> str | None:
    """``utf-16-le``/``utf-16-be`` when the bytes look like ASCII-range text in UTF-16, else None."""
    if len(data) < 2 or len(data) % 2:
        return None
    even, odd = data[0::2], data[1::2]
    if odd.count(0) >= 0.9 * len(odd) and not even.count(0):
        return "utf-16-le"
    if even.count(0) >= 0.9 * len(even) and not odd.count(0):
        return "utf-16-be"
    return None


def decode_caption(data: bytes, name: str | Path) -> CaptionFile:
    """Decodes a caption file's bytes (see the module docstring for the order tried).

    Args:
        data: The file's bytes.
        name: The file, for the error message.

    Raises:
        LorafitError: the bytes are not text in any of these encodings (a binary file, or a
            UTF-16 byte-order mark followed by bytes that are not UTF-16).
    """
    if data.startswith(codecs.BOM_UTF8):
        encodings = ["utf-8-sig"]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encodings = ["utf-16"]
    else:
        encodings = [UTF8, *filter(None, [_utf16_without_bom(data)])]
    for encoding in encodings:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if not _BINARY.search(text):
            return CaptionFile(text, encoding)
    if encodings == ["utf-16"]:
        raise LorafitError(
            f"caption file {name} starts with a UTF-16 byte-order mark but is not UTF-16 text; re-save it as UTF-8"
        )
    if _BINARY.search(data.decode("latin-1")):
        raise LorafitError(f"caption file {name} cannot be read as text (it holds control bytes); re-save it as UTF-8")
    try:
        return CaptionFile(data.decode("cp1252"), "cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d are undefined in Windows-1252
        return CaptionFile(data.decode("latin-1"), "latin-1")


def read_caption_file(path: Path) -> CaptionFile | None:
    """Reads and decodes a caption sidecar; None when there is no such file.

    Raises:
        LorafitError: the file cannot be read (permissions) or is not text.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise LorafitError(f"caption file {path} is a folder; rename it or the image beside it") from None
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise LorafitError(f"cannot read caption file {path} ({reason}); check its permissions") from None
    return decode_caption(data, path)
