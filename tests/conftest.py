"""Shared fixtures: tiny pipelines of each family and a small generated dataset, built once."""

from __future__ import annotations

import os
import tempfile

# No model hub here or in CI: every load must be satisfied locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Prepared folders and shard indexes of the tests stay out of the user's ~/.cache.
os.environ.setdefault("LORAFIT_CACHE", os.path.join(tempfile.gettempdir(), f"lorafit-test-cache-{os.getuid()}"))

import pytest
import torch

# Tests run in parallel workers (pytest-xdist); one thread each avoids oversubscribing 2 cores.
torch.set_num_threads(int(os.environ.get("LORAFIT_TEST_THREADS", "1")))

FAMILIES = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    from lorafit.families.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    return {family: str(save_tiny_pipeline(family, root / family)) for family in (*FAMILIES, "flux")}


class _TinyModels(dict):
    """Family -> tiny pipeline directory, each built on first use (the LLM-conditioned families take a
    few seconds each, and most test files use none of them)."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> str:
        from lorafit.families.tiny import save_tiny_pipeline

        self[family] = str(save_tiny_pipeline(family, self.root / family))
        return self[family]


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, str]:
    """Tiny pipelines of the transformer families added after Flux (``qwen-image``, ``z-image``,
    ``flux2-klein``), built when a test first asks for one."""
    return _TinyModels(tmp_path_factory.mktemp("tiny-families"))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> str:
    from lorafit.data.demo_dataset import write_demo_dataset

    return str(write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", num_images=4, resolution=64))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    from lorafit.inference.tiny_clip import save_tiny_clip

    return str(save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip"))


@pytest.fixture(scope="session")
def masked_data(tmp_path_factory, demo_data) -> str:
    """The demo data with a loss mask beside every image: ``star_NNN_mask.png``, the left half white
    (learn), the right half black (background), so crops and flips must move it with the image."""
    import shutil
    from pathlib import Path

    from PIL import Image

    root = tmp_path_factory.mktemp("masked") / "data"
    shutil.copytree(demo_data, root)
    for image in sorted(Path(root).rglob("star_*.png")):
        with Image.open(image) as img:
            width, height = img.size
        mask = Image.new("L", (width, height), 0)
        mask.paste(255, (0, 0, width // 2, height))
        mask.save(image.with_name(f"{image.stem}_mask.png"))
    return str(root)
