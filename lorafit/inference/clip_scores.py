"""CLIP embeddings and the two similarities the selection metrics and the probe are built on.

- image-image: cosine similarity of CLIP image embeddings (DreamBooth's "CLIP-I"): does a
  generation look like the training images?
- text-image: cosine similarity of a prompt's and an image's embeddings ("CLIP-T"): does a
  generation show what the prompt asked for?

Any transformers ``CLIPModel`` with its processor works (``openai/clip-vit-large-patch14``,
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, a local directory). The absolute numbers depend on
the CLIP model; compare them only within one report.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from lorafit.errors import LorafitError


def _features(output) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding;
    # transformers 4 returned the tensor itself.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """A CLIP model and processor loaded by name, giving L2-normalised embeddings.

    Args:
        name: Hub id or local directory of a transformers ``CLIPModel`` (with its processor files).
        device: Where to run it.
        batch_size: Images per forward pass.
    """

    def __init__(self, name: str, device: torch.device | str = "cpu", batch_size: int = 16):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(name).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(name)
        except (OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise LorafitError(
                f"--clip_model {name}: could not load a CLIP model and processor ({first}); "
                "give a transformers CLIPModel directory or hub id, e.g. openai/clip-vit-large-patch14"
            ) from None
        self.name = name
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[N, D]`` unit-length image embeddings."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            chunks.append(_features(self.model.get_image_features(pixel_values=pixels)).float())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1).cpu()

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, D]`` unit-length text embeddings (texts cut at CLIP's 77 tokens)."""
        inputs = self.processor(text=list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        return torch.nn.functional.normalize(_features(self.model.get_text_features(**inputs)).float(), dim=-1).cpu()


def mean_similarity_to_set(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per row of ``embeddings``: its mean cosine similarity to every row of ``references``."""
    return (embeddings @ references.T).mean(dim=1)


def mean_pairwise_similarity(embeddings: torch.Tensor) -> float:
    """Mean cosine similarity between distinct rows (how alike a set is within itself)."""
    count = embeddings.shape[0]
    if count < 2:
        return 1.0
    similarity = embeddings @ embeddings.T
    return float((similarity.sum() - similarity.diagonal().sum()) / (count * (count - 1)))
