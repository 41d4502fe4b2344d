"""benchmarks/toyworld.md is written by several tools, each owning one part: this replaces one part and
keeps the others as they are, in their order.

A part starts at one of the :data:`PARTS` headings and runs to the next one (or the end of the file).
"""

from __future__ import annotations

from pathlib import Path

PARTS = (
    "# Toy world quality benchmark",  # tools/bench_toyworld.py (the SD-architecture demo)
    "# Toy world quality benchmark: the FLUX.1-architecture base",  # tools/bench_toyworld_flux.py
    "## Resize:",  # tools/bench_toyworld_resize.py (a prefix: the heading names the ranks)
    "## Teaching methods on the toy world",  # tools/bench_teaching_methods.py
)


def part_of(line: str) -> str | None:
    """The :data:`PARTS` entry ``line`` starts, if it is a part heading."""
    for part in PARTS:
        if line == part or (part.endswith(":") and line.startswith(part)):
            return part
    return None


def split_parts(text: str) -> list[tuple[str | None, str]]:
    """``text`` as (part, text) pieces in order; what comes before the first heading has part None."""
    pieces: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in text.splitlines(keepends=True):
        part = part_of(line.rstrip("\n"))
        if part is not None:
            pieces.append((part, []))
        pieces[-1][1].append(line)
    return [(part, "".join(lines)) for part, lines in pieces if part is not None or "".join(lines).strip()]


def replace_part(path: Path, text: str) -> None:
    """Write ``text`` (which starts with its part's heading) in place of that part of ``path``, or
    append it; every other part stays as it was."""
    text = text.lstrip("\n")
    part = part_of(text.splitlines()[0])
    if part is None:
        raise ValueError(f"the report must start with one of {PARTS}")
    pieces = split_parts(path.read_text()) if path.is_file() else []
    body = text.rstrip() + "\n"
    if any(p == part for p, _ in pieces):
        pieces = [(p, body if p == part else t) for p, t in pieces]
    else:
        pieces.append((part, body))
    path.write_text("\n".join(t.rstrip() + "\n" for _, t in pieces))
