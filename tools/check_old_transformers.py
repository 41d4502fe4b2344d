"""Check that lorafit's diffusers-format files load in diffusers on a transformers-4 install.

lorafit's tests run on transformers 5; most users of diffusers' ``load_lora_weights`` still run
transformers 4, where ``CLIPTextModel`` keeps its ``text_model.`` level. This writes LoRA and DoRA
files (SDXL: both text encoders and the UNet) with this checkout, then, run by another interpreter,
loads them with that interpreter's diffusers and compares every text-encoder tensor (DoRA
magnitudes included) with the file. Step 2 imports neither lorafit nor anything of this checkout.

    python tools/check_old_transformers.py write /tmp/t4                  # this environment
    python -m venv --without-pip /tmp/venv4                               # a transformers-4 one, reusing torch:
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/venv4/lib/python3.11/site-packages/zz.pth
    pip --python /tmp/venv4/bin/python install --no-deps --target /tmp/venv4/lib/python3.11/site-packages \\
        transformers==4.57.1 diffusers==0.35.2 peft==0.17.1 huggingface_hub==0.35.3 tokenizers==0.22.1
    HF_HUB_OFFLINE=1 /tmp/venv4/bin/python tools/check_old_transformers.py check /tmp/t4

Checked 2026-08 (transformers 4.57.1, diffusers 0.35.2, PEFT 0.17.1 and 0.21.2): every tensor loads;
files in lorafit's earlier layout (``text_encoder.encoder.layers...``) leave CLIP-L without its LoRA.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def write(folder: Path) -> None:
    import torch

    from lorafit.families.tiny import save_tiny_pipeline
    from lorafit.networks.files import save_diffusers
    from lorafit.networks.lora_weights import LoraModuleWeights

    model = save_tiny_pipeline("sdxl", folder / "tiny-sdxl")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model))
    generator = torch.Generator().manual_seed(0)
    for dora in (False, True):
        weights = {}
        for component in ("unet", "text_encoder", "text_encoder_2"):
            targets = ("attn1.to_q",) if component == "unet" else ("q_proj", "out_proj", "fc1")
            modules = {}
            for name, layer in getattr(pipe, component).named_modules():
                if name.endswith(targets):
                    out, inner = layer.weight.shape
                    scale = layer.weight.detach().norm(dim=1, keepdim=True) * 1.5 if dora else None
                    down, up = torch.randn(2, inner, generator=generator), torch.randn(out, 2, generator=generator)
                    modules[name] = LoraModuleWeights(down, up, 1.0, scale)
            weights[component] = modules
        save_diffusers(folder / f"{'dora' if dora else 'lora'}.safetensors", "sdxl", weights)
    print(f"wrote {folder}/lora.safetensors and dora.safetensors for {model}")


def check(folder: Path) -> int:
    import torch
    import transformers
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    print(f"transformers {transformers.__version__}")
    model, failures = str(folder / "tiny-sdxl"), 0
    for path in sorted(folder.glob("*.safetensors")):
        # Text encoders from their configs: a transformers-5 checkpoint does not load in transformers 4.
        names = ("text_encoder", "text_encoder_2")
        configs = {name: CLIPTextConfig.from_pretrained(model, subfolder=name) for name in names}
        encoders = {
            "text_encoder": CLIPTextModel(configs["text_encoder"]),
            "text_encoder_2": CLIPTextModelWithProjection(configs["text_encoder_2"]),
        }
        pipe = DiffusionPipeline.from_pretrained(model, tokenizer=None, tokenizer_2=None, **encoders)
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
        checked = wrong = 0
        for key, tensor in load_file(str(path)).items():
            component, _, rest = key.partition(".")
            if component not in encoders:
                continue
            module, _, part = rest.partition(".lora_")
            layer = encoders[component].get_submodule(module)
            holder = {"A": "lora_A", "B": "lora_B", "m": "lora_magnitude_vector"}[part[0]]
            container = getattr(layer, holder, None)
            loaded = container["x"] if container is not None and "x" in container else None
            checked += 1
            wrong += loaded is None or not torch.equal(loaded.weight.detach().flatten(), tensor.flatten())
        print(f"{path.name}: {checked} text-encoder tensors, {wrong} not loaded as written")
        failures += wrong
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("write", "check"))
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    os.makedirs(args.folder, exist_ok=True)
    if args.step == "write":
        write(args.folder)
        return 0
    return check(args.folder)


if __name__ == "__main__":
    sys.exit(main())
