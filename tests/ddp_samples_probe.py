"""Run by tests/test_samples_ddp.py: a 2-rank CPU DDP fit that draws sample images; each rank records its share.

Lightning's ``ddp`` strategy starts rank 1 by running this script again, as a real launch does.
Usage: python ddp_samples_probe.py MODEL DATA OUT
"""

import json
import sys
from pathlib import Path

import lightning as L
from training import tiny_data

from lorafit.callbacks.export import LoraExport
from lorafit.callbacks.samples import SampleImages
from lorafit.inference.render_options import RenderOptions
from lorafit.training.module import LoraDiffusionModule

PROMPTS = ["ohwx star, a yellow star", "a photo of a cat --n blurry", "a red circle --ss ddim"]


class RecordedSamples(SampleImages):
    """Writes ``rank<N>.json``: the (prompt, seed) of every image this rank drew in the last round."""

    def __init__(self, out: Path, **kwargs):
        super().__init__(**kwargs)
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        drawn = [[image.prompt, image.request.seed] for image in self.drawn_here]
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(drawn))


def main() -> None:
    model, data, out = sys.argv[1:4]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0)
    samples = RecordedSamples(
        out, prompts=PROMPTS, render=RenderOptions(steps=2, seed=[0, 1]), compare_base=True, log_images=False
    )
    trainer = L.Trainer(
        default_root_dir=str(out),
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LoraExport(name="ddp", formats=["kohya"]), samples],
    )
    module = LoraDiffusionModule(model=model, rank=4, alpha=4.0, learning_rate=3e-2)
    trainer.fit(module, datamodule=tiny_data(data, batch_size=1, repeats=1))


if __name__ == "__main__":
    main()
