"""WD14-style booru taggers: an ONNX multi-label classifier plus its ``selected_tags.csv``.

The format is the one SmilingWolf's ``wd-*-tagger`` models ship and kohya's
``tag_images_by_wd14_tagger.py`` reads:

* ``model.onnx``: input ``[batch, size, size, 3]`` float32, **BGR, 0-255, NHWC** (no
  normalisation), output ``[batch, n_tags]`` probabilities (already through a sigmoid);
* ``selected_tags.csv``: columns ``tag_id,name,category,count``, one row per output column, in
  order. Category 9 = rating (``general``, ``sensitive``, ...), 4 = character, 0 = general.

Rating tags are never written (they describe the picture's audience, not its content). Images are
padded to a white square before resizing, as the taggers were trained, so nothing is cropped off.
The input size is read from the model (448 for the released taggers), not assumed.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from lorafit.captioning.hub_access import cache_first
from lorafit.captioning.tags import tag_to_prompt
from lorafit.errors import LorafitError

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
RATING, GENERAL, CHARACTER = 9, 0, 4
# Used only when the model declares a dynamic spatial size; every released WD14 tagger is 448.
DEFAULT_SIZE = 448


class TagList(NamedTuple):
    """The tagger's vocabulary: prompt spelling and category of each output column."""

    names: list[str]
    categories: np.ndarray


def is_tagger_dir(path: Path) -> bool:
    """True when ``path`` holds a WD14-style tagger (``model.onnx`` + ``selected_tags.csv``)."""
    return (path / MODEL_FILE).is_file() and (path / TAGS_FILE).is_file()


def read_tag_list(path: Path) -> TagList:
    """Reads ``selected_tags.csv``; tag names come back in prompt spelling (see tags.tag_to_prompt).

    Raises:
        LorafitError: the file lacks the ``name``/``category`` columns or has a bad category.
    """
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise LorafitError(
            f"{path} is not a tagger tag list: it needs the columns tag_id,name,category,count "
            "(the selected_tags.csv of a WD14 tagger)"
        )
    try:
        categories = np.array([int(row["category"]) for row in rows])
    except ValueError:
        raise LorafitError(
            f"{path} has a non-numeric category; expected 9 (rating), 4 (character) or 0 (general)"
        ) from None
    return TagList([tag_to_prompt(row["name"]) for row in rows], categories)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise LorafitError(
            "WD14 taggers run on onnxruntime, which is not installed; "
            "pip install 'lorafit[caption]' (or onnxruntime-gpu for CUDA)"
        ) from None
    return onnxruntime


def fetch_tagger(repo_id: str) -> Path:
    """Downloads (or finds in the Hugging Face cache) a hub tagger's two files; returns their folder."""
    from huggingface_hub import hf_hub_download

    def download(local_files_only: bool) -> str:
        hf_hub_download(repo_id, TAGS_FILE, local_files_only=local_files_only)
        return hf_hub_download(repo_id, MODEL_FILE, local_files_only=local_files_only)

    try:
        model = cache_first(repo_id, download)
    except LorafitError:
        raise
    except Exception as error:  # noqa: BLE001 -- offline, unknown repo, gated: all mean "cannot use this name"
        raise LorafitError(
            f"cannot get {MODEL_FILE} and {TAGS_FILE} of tagger {repo_id!r} from the Hugging Face "
            f"hub ({type(error).__name__}); download them into a folder and pass --model FOLDER"
        ) from None
    return Path(model).parent


class WD14Tagger:
    """Tags images with a WD14-style ONNX tagger.

    Args:
        model_dir: Folder holding ``model.onnx`` and ``selected_tags.csv``.
        general_threshold: Probability a general tag needs to be written (kohya's --general_threshold).
        character_threshold: Probability a character tag needs (kohya's --character_threshold).
        device: ``auto`` (CUDA when onnxruntime has it), ``cpu``, ``cuda`` or ``cuda:N``; CUDA needs
            the onnxruntime-gpu package.
    """

    kind = "wd14"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        general_threshold: float = 0.35,
        character_threshold: float = 0.35,
        device: str = "auto",
    ) -> None:
        model_dir = Path(model_dir)
        if not is_tagger_dir(model_dir):
            raise LorafitError(
                f"--model {model_dir} does not hold {MODEL_FILE} and {TAGS_FILE}; "
                "pass the folder of a WD14-style tagger"
            )
        for name, value in (("general_threshold", general_threshold), ("character_threshold", character_threshold)):
            if not 0.0 <= value <= 1.0:
                raise LorafitError(f"--{name} must be a probability between 0 and 1; got {value}")
        self.general_threshold, self.character_threshold = general_threshold, character_threshold
        self.tags = read_tag_list(model_dir / TAGS_FILE)
        self.session = self._session(model_dir / MODEL_FILE, device)
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.size = self._input_size(model_input.shape, model_dir)
        width = self.session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != len(self.tags.names):
            raise LorafitError(
                f"{model_dir / MODEL_FILE} predicts {width} tags but {TAGS_FILE} lists "
                f"{len(self.tags.names)}; the two files come from different taggers"
            )

    @staticmethod
    def _session(model_path: Path, device: str):
        ort = _onnxruntime()
        providers = ["CPUExecutionProvider"]
        if device == "auto":
            # CUDA comes with the separate onnxruntime-gpu package; use it only when it is there.
            cuda = "CUDAExecutionProvider" in ort.get_available_providers()
            device = "cuda" if cuda else "cpu"
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise LorafitError(
                    f"--device {device}: this onnxruntime has no CUDA support; "
                    "pip install onnxruntime-gpu, or use --device cpu"
                )
            device_id = int(device.split(":")[1]) if ":" in device else 0
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        try:
            return ort.InferenceSession(str(model_path), providers=providers)
        except Exception as error:  # noqa: BLE001 -- onnxruntime raises its own exception types for bad files
            reason = " ".join(str(error).split())[:200]
            raise LorafitError(f"cannot load tagger {model_path} ({reason}); re-download model.onnx") from None

    @staticmethod
    def _input_size(shape: list, model_dir: Path) -> int:
        # WD14 taggers are NHWC; a channels-first model would silently see garbage.
        if len(shape) != 4 or shape[3] != 3:
            raise LorafitError(
                f"{model_dir / MODEL_FILE} takes input shape {shape}; a WD14 tagger takes [batch, size, size, 3] (NHWC)"
            )
        return shape[1] if isinstance(shape[1], int) else DEFAULT_SIZE

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One RGB image as the tagger's input row: white-padded square, resized, BGR float 0-255."""
        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        if side != self.size:
            square = square.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1]

    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        """``[len(images), n_tags]`` tag probabilities."""
        batch = np.ascontiguousarray(np.stack([self.preprocess(image) for image in images]))
        return self.session.run(None, {self.input_name: batch})[0]

    def __call__(self, images: list[Image.Image]) -> list[str]:
        """One caption per image: character tags, then general tags, each most probable first."""
        return [", ".join(self.select(row)) for row in self.probabilities(images)]

    def select(self, probs: np.ndarray) -> list[str]:
        """The tags of one probability row passing their category's threshold.

        Only general and character tags are written: never rating tags, nor other categories
        (artist, copyright) a tagger's CSV may list.
        """
        cats = self.tags.categories
        chosen = []
        for category, threshold in ((CHARACTER, self.character_threshold), (GENERAL, self.general_threshold)):
            hits = np.flatnonzero((cats == category) & (probs >= threshold))
            chosen += [self.tags.names[i] for i in hits[np.argsort(-probs[hits], kind="stable")]]
        return chosen
