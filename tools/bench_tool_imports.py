"""Start-up cost of the caption tools: `lorafit review --help`, `lorafit caption --help`, the
review page's first caption save and a one-image `lorafit caption` run with a WD14 (ONNX) tagger,
each in a fresh interpreter (import time is most of what is measured).

    python tools/bench_tool_imports.py [--checkout DIR] [--repeats 3]

``--checkout`` is the lorafit source tree to time (default: this one), e.g. an older commit
unpacked with ``git archive COMMIT | tar -x -C DIR``, to compare before and after a change.
Prints a Markdown table; results go to benchmarks/tool-imports.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The first save of a caption through the review server, timed inside the child process.
FIRST_SAVE = """
import sys, tempfile, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from review_fixtures import make_tree, request, running_server
root = make_tree(Path(tempfile.mkdtemp()))
with running_server(root) as server:
    item = request(server, "GET", "/api/items")[1]["items"][0]
    start = time.perf_counter()
    status, _ = request(server, "POST", "/api/save",
                        {{"changes": [{{"id": item["id"], "text": "edited", "version": item["version"]}}]}})
    assert status == 200
    print(time.perf_counter() - start, "torch" in sys.modules)
"""


# One image captioned by the tiny WD14-format tagger of the tests, timed inside the child process.
CAPTION_RUN = """
import sys, tempfile, time
from pathlib import Path
from PIL import Image
start = time.perf_counter()
from lorafit.captioning.caption import caption
image = Path(tempfile.mkdtemp()) / "5_ohwx dog" / "a.png"
image.parent.mkdir()
Image.new("RGB", (40, 24), (220, 20, 20)).save(image)
caption(str(image.parent.parent), model={tagger!r}, device="cpu")
print(time.perf_counter() - start, "torch" in sys.modules, file=sys.stderr)
"""


def _env(checkout: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def time_help(checkout: Path, verb: str, repeats: int) -> float:
    """Best wall time of `lorafit VERB --help` in a new process (interpreter start included)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "lorafit.cli", verb, "--help"],
            env=_env(checkout),
            cwd=checkout,
            capture_output=True,
            check=True,
        )
        times.append(time.perf_counter() - start)
    return min(times)


def time_first_save(checkout: Path, repeats: int) -> tuple[float, bool]:
    """Best time of the review server's first save (HTTP round trip), and whether torch got imported."""
    runs = []
    for _ in range(repeats):
        code = FIRST_SAVE.format(tests=str(REPO / "tests"))
        out = subprocess.run(
            [sys.executable, "-c", code], env=_env(checkout), cwd=checkout, capture_output=True, text=True, check=True
        ).stdout.split()
        runs.append((float(out[0]), out[1] == "True"))
    return min(runs)


def time_caption_run(checkout: Path, tagger: Path, repeats: int) -> tuple[float, bool]:
    """Best time of import + one-image WD14 captioning, and whether torch got imported."""
    runs = []
    for _ in range(repeats):
        err = subprocess.run(
            [sys.executable, "-c", CAPTION_RUN.format(tagger=str(tagger))],
            env=_env(checkout),
            cwd=checkout,
            capture_output=True,
            text=True,
            check=True,
        ).stderr.split()
        runs.append((float(err[-2]), err[-1] == "True"))
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=REPO, help="lorafit source tree to time")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measure; the best is reported")
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    save, torch_imported = time_first_save(checkout, args.repeats)
    print(f"| measure | best of {args.repeats} |")
    print("|---|---|")
    for verb in ("review", "caption"):
        print(f"| `lorafit {verb} --help` | {time_help(checkout, verb, args.repeats):.2f} s |")
    print(f"| review page, first caption save | {save:.2f} s (torch imported: {torch_imported}) |")
    sys.path.insert(0, str(REPO / "tests"))
    from caption_models import save_tiny_tagger

    with tempfile.TemporaryDirectory() as folder:
        tagger = save_tiny_tagger(Path(folder) / "tagger")
        seconds, torch_imported = time_caption_run(checkout, tagger, args.repeats)
    print(f"| `lorafit caption` import + 1 image, WD14 tagger | {seconds:.2f} s (torch imported: {torch_imported}) |")


if __name__ == "__main__":
    main()
