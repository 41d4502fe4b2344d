"""Tiny random-weight captioning models built offline: a BLIP and a WD14-format ONNX tagger.

Both are written in the exact on-disk formats the real ones ship in (``save_pretrained`` folder
with processor and tokenizer; ``model.onnx`` + ``selected_tags.csv``), so ``lorafit caption``
loads them through the same code path as a downloaded model.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

BLIP_WORDS = ["a", "photo", "of", "dog", "cat", "the", "on", "grass", "sitting", "red", "ball"]

# (name, category) rows of the tiny tagger: ratings first as in the real CSVs, then general tags
# (one with an underscore, one emoticon), then characters.
TAGGER_TAGS = [
    ("general", 9),
    ("sensitive", 9),
    ("questionable", 9),
    ("explicit", 9),
    ("dog", 0),
    ("long_hair", 0),
    ("outdoors", 0),
    ("^_^", 0),
    ("grass", 0),
    ("solo", 0),
    ("ohwx_character", 4),
]
TAGGER_SIZE = 32


def save_tiny_blip(directory: Path) -> Path:
    """A 1-layer BLIP (vision + text decoder) with a WordPiece tokenizer from a local vocab file."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *BLIP_WORDS]
    vocab_file = directory / "vocab-source.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab_file))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's decoder starts from [DEC]
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            encoder_hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=64,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            sep_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_hidden_layers=1,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    vocab_file.unlink()
    return directory


class _TinyTagger(torch.nn.Module):
    """NHWC BGR 0-255 in, per-tag sigmoid probabilities out, like a WD14 tagger.

    The "general"-ish tag probabilities depend on colour: ``dog`` fires for red-dominant images
    (red is the *last* BGR channel), ``grass`` for green ones, so tests can tell images apart and
    catch a channel-order mix-up; ``solo`` is always on, rating tags always very likely.
    """

    def __init__(self) -> None:
        super().__init__()
        n = len(TAGGER_TAGS)
        self.head = torch.nn.Linear(3, n)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.fill_(-6.0)
            names = [name for name, _ in TAGGER_TAGS]
            self.head.bias[:4] = 6.0  # ratings: must never be written however likely
            self.head.bias[names.index("solo")] = 6.0
            self.head.bias[names.index("long_hair")] = 6.0
            self.head.bias[names.index("^_^")] = 6.0
            self.head.bias[names.index("ohwx_character")] = 0.0  # p = 0.5: passes 0.35, not 0.85
            # Mean channel values in 0..1, B, G, R order; strong enough to survive the white padding.
            self.head.weight[names.index("dog")] = torch.tensor([-20.0, -20.0, 40.0])
            self.head.weight[names.index("grass")] = torch.tensor([-20.0, 40.0, -20.0])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = pixels.mean(dim=(1, 2)) / 255.0
        return torch.sigmoid(self.head(mean))


def save_tiny_tagger(directory: Path) -> Path:
    """``model.onnx`` (input ``[batch, 32, 32, 3]``) and ``selected_tags.csv`` of a tiny tagger."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        _TinyTagger().eval(),
        (torch.zeros(1, TAGGER_SIZE, TAGGER_SIZE, 3),),
        str(directory / "model.onnx"),
        input_names=["input_1"],
        output_names=["predictions_sigmoid"],
        dynamic_axes={"input_1": {0: "batch"}, "predictions_sigmoid": {0: "batch"}},
        dynamo=False,
    )
    with open(directory / "selected_tags.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for index, (name, category) in enumerate(TAGGER_TAGS):
            writer.writerow([1000 + index, name, category, 100 - index])
    return directory
