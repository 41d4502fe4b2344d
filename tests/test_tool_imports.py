"""The caption tools never import torch or Lightning: importing them costs seconds (measured 8.6 s
on the first caption save of `lorafit review` before atomic_io stopped importing them)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from caption_models import save_tiny_tagger
from cli_runs import REPO, lorafit_env

HEAVY = ("torch", "lightning")


def _heavy_modules_after(code: str, tmp_path: Path) -> list[str]:
    """Runs ``code`` in a fresh interpreter (this checkout, tests/ on the path); the heavy modules it imported."""
    script = tmp_path / "probe.py"
    script.write_text(
        textwrap.dedent(code)
        + textwrap.dedent(f"""
        import json, sys
        print("HEAVY", json.dumps([name for name in {HEAVY!r} if name in sys.modules]))
    """)
    )
    env = lorafit_env()
    env["PYTHONPATH"] = f"{REPO / 'tests'}:{env['PYTHONPATH']}"
    result = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("HEAVY"))
    return json.loads(line.removeprefix("HEAVY "))


def test_review_help_and_saving_a_caption_import_neither_torch_nor_lightning(tmp_path):
    heavy = _heavy_modules_after(
        f"""
        from pathlib import Path
        from lorafit.cli import main
        from review_fixtures import make_tree, request, running_server

        for verb in ("review", "caption"):
            try:
                main([verb, "--help"])
            except SystemExit:
                pass
        root = make_tree(Path({str(tmp_path)!r}))
        with running_server(root) as server:
            item = request(server, "GET", "/api/items")[1]["items"][0]
            change = {{"id": item["id"], "text": "ohwx dog, edited", "version": item["version"]}}
            status, answer = request(server, "POST", "/api/save", {{"changes": [change]}})
        assert status == 200 and answer["results"][0]["status"] == "saved", answer
        assert (root / item["id"].partition("/")[2]).with_suffix(".txt").read_text() == "ohwx dog, edited\\n"
    """,
        tmp_path,
    )
    assert heavy == []


def test_captioning_with_a_wd14_tagger_imports_neither_torch_nor_lightning(tmp_path):
    tagger = save_tiny_tagger(tmp_path / "tagger")  # built with torch here; the probe is a fresh process
    heavy = _heavy_modules_after(
        f"""
        from pathlib import Path
        from PIL import Image
        from lorafit.captioning.caption import caption

        image = Path({str(tmp_path)!r}) / "data" / "5_ohwx dog" / "a.png"
        image.parent.mkdir(parents=True)
        Image.new("RGB", (40, 24), (220, 20, 20)).save(image)
        assert caption(str(image.parent.parent), model={str(tagger)!r}, device="cpu")["written"] == 1
        assert "dog" in image.with_suffix(".txt").read_text()
    """,
        tmp_path,
    )
    assert heavy == []
