"""The demo LoRA's training set: pictures of the held-out star, captioned with the trigger word.

Written as a kohya folder (``<out>/10_ohwx/ohwx_000.png`` + ``ohwx_000.txt``), the layout a user
brings, so any lorafit DataModule reads it through the same ``data.train_dir`` key. Captions
follow the world's template with the trigger in place of the shape's name, "a red ohwx on a blue
background": they describe what varies (colours) and leave the new concept to the trigger word,
as the guides recommend.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Union

from lorafit.errors import LorafitError
from lorafit.toyworld.world import HELD_OUT_SHAPE, RESOLUTION, TRIGGER, render, sample_scene

logger = logging.getLogger("lorafit.toyworld")


def write_concept_dataset(
    out: Union[str, Path],
    num_images: int = 16,
    repeats: int = 10,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write star pictures captioned with the trigger word as ``out/<repeats>_ohwx/``.

    The same seed always writes byte-identical files. Pass ``out`` as ``data.train_dir``.

    Args:
        out: Dataset root to create.
        num_images: How many pictures to draw (colours and backgrounds vary, shape and trigger do not).
        repeats: Times each picture is seen per epoch (kohya's folder-name prefix).
        seed: Seed of the pictures.
        overwrite: Redraw the folder if it already exists.

    Returns:
        The dataset root ``out``.
    """
    if num_images < 1:
        raise LorafitError(f"toy-data num_images is {num_images}; use 1 or more")
    if repeats < 1:
        raise LorafitError(f"toy-data repeats is {repeats}; use 1 or more")
    root = Path(out).expanduser()
    if root.exists() and not root.is_dir():
        raise LorafitError(f"toy-data: {root} is a file; choose a folder path")
    folder = root / f"{repeats}_{TRIGGER}"
    if folder.exists() and not overwrite:
        logger.info("concept dataset already at %s; pass --overwrite true to redraw it", folder)
        return root
    # Written into a hidden sibling and renamed into place: an interrupted run leaves nothing a
    # later call (or the folder scanner, which skips hidden folders) would take for a dataset.
    staging = root / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    rng = random.Random(seed)
    for i in range(num_images):
        scene = sample_scene(rng, (HELD_OUT_SHAPE,))
        render(scene, RESOLUTION).save(staging / f"{TRIGGER}_{i:03d}.png", format="PNG")
        (staging / f"{TRIGGER}_{i:03d}.txt").write_text(scene.caption(TRIGGER) + "\n", encoding="utf-8")
    for stale in root.glob(f"*_{TRIGGER}"):  # a folder of another repeat count would add to this one
        shutil.rmtree(stale)
    os.replace(staging, folder)
    logger.info("wrote %d pictures of the held-out concept to %s", num_images, folder)
    return root
