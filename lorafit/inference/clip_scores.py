"""CLIP scores for the selection metrics and the probe, through torchmetrics' ``clip_score``.

Two kinds, both torchmetrics' CLIP score (``max(100 * cos, 0)`` of the mean over pairs) divided
by 100, so they read as cosine similarities:

- image-image: does a generation look like the training images (DreamBooth's "CLIP-I")?
- text-image: does a generation show what its prompt asked for ("CLIP-T")?

Any transformers ``CLIPModel`` with its processor works: ``openai/clip-vit-large-patch14``,
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, a local directory, or the toy world's own CLIP
(``lorafit/toyworld/clip``, the one CLIP that knows the toy base's pictures). The absolute numbers
depend on the CLIP model; compare them only within one report.

:func:`image_features` gives the same CLIP's image tower as a feature extractor for torchmetrics'
FID/KID (``feature=``), where Inception weights are not at hand.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from lorafit.errors import LorafitError


def _features(output) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding;
    # transformers 4 returned the tensor itself.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _ScoredModel(torch.nn.Module):
    """The CLIP model as torchmetrics' ``clip_score`` calls it, with two things it gets wrong here fixed.

    - torchmetrics 1.9 divides ``get_image_features(...)`` by its norm: with transformers 5 that is a
      ``ModelOutput``, not a tensor, and fails; here it is the projected embedding.
    - ``clip_score`` scores *pairs* and encodes both images of every pair. The fidelity score pairs
      every generation with every training image, so each training image would be encoded once per
      generation; embeddings are kept by picture content and each picture is encoded once.
    """

    def __init__(self, model, batch_size: int):
        super().__init__()
        self.model, self.config, self.batch_size = model, model.config, batch_size
        self._seen: dict[bytes, torch.Tensor] = {}

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        keys = [hashlib.blake2b(row.cpu().numpy().tobytes(), digest_size=16).digest() for row in pixel_values]
        first: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in self._seen:
                first.setdefault(key, i)
        new = list(first.values())
        for start in range(0, len(new), self.batch_size):
            chunk = new[start : start + self.batch_size]
            embeddings = _features(self.model.get_image_features(pixel_values=pixel_values[chunk])).float()
            self._seen.update({keys[i]: e for i, e in zip(chunk, embeddings)})
        return torch.stack([self._seen[key] for key in keys])

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return _features(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)).float()


def _tensor(image: Image.Image, device: torch.device) -> torch.Tensor:
    """uint8 ``[3, H, W]``: what torchmetrics takes as an image."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).to(device)


class ClipScorer:
    """A CLIP model and processor loaded by name; scores through torchmetrics' ``clip_score``.

    Args:
        name: Hub id or local directory of a transformers ``CLIPModel`` (with its processor files).
        device: Where to run it.
        batch_size: Images per forward pass.
    """

    def __init__(self, name: str, device: torch.device | str = "cpu", batch_size: int = 16):
        from transformers import CLIPModel, CLIPProcessor

        from lorafit.families.loading import loading_bars_off

        self.device = torch.device(device)
        try:
            with loading_bars_off():  # transformers' "Loading weights" bar between lorafit's lines
                model = CLIPModel.from_pretrained(name)
            if self.device.type == "cpu":
                model = model.float()  # small CLIPs ship in fp16 (the toy world's); a CPU wants float32
            model = model.to(self.device).eval()
            self.processor = CLIPProcessor.from_pretrained(name)
        except (OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise LorafitError(
                f"--clip_model {name}: could not load a CLIP model and processor ({first}); "
                "give a transformers CLIPModel directory or hub id, e.g. openai/clip-vit-large-patch14, "
                "or lorafit/toyworld/clip for the toy base"
            ) from None
        self.name = name
        self.scored = _ScoredModel(model, batch_size)

    @torch.no_grad()
    def score(self, source: Sequence[Image.Image | str], target: Sequence[Image.Image | str]) -> float:
        """torchmetrics' CLIP score of the pairs ``(source[i], target[i])``, divided by 100."""
        from torchmetrics.functional.multimodal import clip_score

        def prepare(items):
            return [_tensor(i, self.device) if isinstance(i, Image.Image) else i for i in items]

        value = clip_score(prepare(source), prepare(target), model_name_or_path=lambda: (self.scored, self.processor))
        return float(value) / 100.0

    def similarity_to_set(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> list[float]:
        """Per image: its CLIP score against every reference image, averaged."""
        return [self.score([image] * len(references), list(references)) for image in images]

    def pairwise_similarity(self, images: Sequence[Image.Image]) -> float:
        """CLIP score over all pairs of distinct images (how alike a set is within itself)."""
        pairs = [(a, b) for i, a in enumerate(images) for j, b in enumerate(images) if i != j]
        if not pairs:
            return 1.0
        return self.score([a for a, _ in pairs], [b for _, b in pairs])

    def text_similarity(self, images: Sequence[Image.Image], texts: Sequence[str]) -> float:
        """CLIP score of each image against its own text (paired), averaged."""
        return self.score(list(images), list(texts))

    def image_features(self) -> torch.nn.Module:
        """This CLIP's image tower as a FID/KID feature extractor (see :class:`ClipImageFeatures`)."""
        return ClipImageFeatures(self)


class ClipImageFeatures(torch.nn.Module):
    """uint8 ``[N, 3, H, W]`` pictures -> ``[N, D]`` CLIP image embeddings, for torchmetrics' FID and KID.

    torchmetrics' default Inception weights come from torch-fidelity's download, which is not
    always possible (offline machines); ``FrechetInceptionDistance(feature=ClipImageFeatures(...))``
    measures the same distance in this CLIP's embedding space instead.
    """

    def __init__(self, scorer: ClipScorer):
        super().__init__()
        self.scorer = scorer
        self.num_features = scorer.scored.model.config.projection_dim

    @torch.no_grad()
    def forward(self, pictures: torch.Tensor) -> torch.Tensor:
        images = [p.permute(1, 2, 0).cpu().numpy() for p in pictures.to(torch.uint8)]
        pixels = self.scorer.processor(images=images, return_tensors="pt")["pixel_values"].to(self.scorer.device)
        return self.scorer.scored.get_image_features(pixels).to(pictures.device)
