"""`lorafit.load_lora`: trained files load into diffusers pipelines at a strength, and compose."""

from __future__ import annotations

import pytest
import torch
from network_reference import merge_into, pipeline, text_outputs
from safetensors.torch import save_file
from training import train, unet_output

import lorafit
from lorafit.errors import LorafitError
from lorafit.networks.kohya_format import kohya_stem


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def trained(request, tiny_models, demo_data, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"load-{family}")
    _, module = train(
        tiny_models[family],
        demo_data,
        root,
        max_epochs=1,
        rank=4,
        alpha=2.0,
        learning_rate=1e-2,
        train_text_encoder=True,
        export={"every_n_epochs": 0},
    )
    expected = {"unet": unet_output(module.unet), "text": text_outputs(_Encoders(module))}
    return family, root / "lora", expected


class _Encoders:
    """The training module's text encoders seen as a pipeline, for ``text_outputs``."""

    def __init__(self, module):
        self.tokenizer = module.base.tokenizers[0]
        self.text_encoder = module.text_encoders[0]
        self.text_encoder_2 = module.text_encoders[1] if len(module.text_encoders) > 1 else None


def _foreign_kohya_file(pipe, family: str, path, seed: int = 3):
    """A kohya file as other trainers write it: fp16, alpha per module (some none), conv and text-encoder keys."""
    generator = torch.Generator().manual_seed(seed)
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if family == "sdxl":
        parts["text_encoder_2"] = pipe.text_encoder_2
    suffixes = {
        "unet": ("to_k", "to_out.0", "conv2", "ff.net.2"),
        "text_encoder": ("k_proj", "fc2"),
        "text_encoder_2": ("out_proj",),
    }
    tensors = {}
    for component, model in parts.items():
        for index, (name, layer) in enumerate(n for n in model.named_modules() if n[0].endswith(suffixes[component])):
            stem = kohya_stem(family, component, name, pipe.unet.config)
            weight = layer.weight
            rank = 2 + index % 3  # ranks differ too
            tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, *weight.shape[1:], generator=generator) * 0.2
            tensors[f"{stem}.lora_up.weight"] = (
                torch.randn(weight.shape[0], rank, *[1] * (weight.dim() - 2), generator=generator) * 0.2
            )
            if index % 4:  # no alpha = alpha equals rank
                tensors[f"{stem}.alpha"] = torch.tensor(float(index % 4))
    save_file({k: v.half() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_loaded_file_reproduces_training_model(trained, tiny_models, fmt):
    family, lora, expected = trained
    pipe = pipeline(tiny_models[family])
    base = unet_output(pipe.unet)
    name = lorafit.load_lora(pipe, lora / ("test.safetensors" if fmt == "kohya" else "diffusers/test.safetensors"))
    assert name == "test"
    assert (base - expected["unet"]).abs().max() > 1e-3, "training changed nothing; the comparison proves nothing"
    assert (unet_output(pipe.unet) - expected["unet"]).abs().max() < 1e-4
    for got, want in zip(text_outputs(pipe), expected["text"]):
        assert (got - want).abs().max() < 1e-4


def test_strength_zero_is_the_base_model_exactly_and_unload_restores_it(trained, tiny_models):
    family, lora, _ = trained
    pipe = pipeline(tiny_models[family])
    base_unet, base_text = unet_output(pipe.unet), text_outputs(pipe)
    lorafit.load_lora(pipe, lora / "test.safetensors", weight=0.0)
    assert torch.equal(unet_output(pipe.unet), base_unet)
    assert all(torch.equal(a, b) for a, b in zip(text_outputs(pipe), base_text))
    lorafit.set_lora_weight(pipe, "test", 1.0)
    assert not torch.equal(unet_output(pipe.unet), base_unet)
    lorafit.unload_lora(pipe, "test")
    assert torch.equal(unet_output(pipe.unet), base_unet)
    assert lorafit.loaded_loras(pipe) == {}
    assert not any(".base_layer" in n or ".lora_" in n for n, _ in pipe.unet.named_modules()), "wrappers left behind"


def test_strength_scales_the_update(trained, tiny_models):
    family, lora, _ = trained
    pipe = pipeline(tiny_models[family])
    lorafit.load_lora(pipe, lora / "test.safetensors", weight=0.4)
    truth = merge_into(pipeline(tiny_models[family]), lora / "test.safetensors", strength=0.4)
    assert (unet_output(pipe.unet) - unet_output(truth.unet)).abs().max() < 1e-4
    for got, want in zip(text_outputs(pipe), text_outputs(truth)):
        assert (got - want).abs().max() < 1e-4


def test_two_files_compose_in_an_img2img_pipeline(trained, tiny_models, tmp_path):
    from diffusers import AutoPipelineForImage2Image

    family, lora, _ = trained
    pipe = AutoPipelineForImage2Image.from_pipe(pipeline(tiny_models[family]))
    assert "Img2Img" in type(pipe).__name__
    foreign = _foreign_kohya_file(pipe, family, tmp_path / "other trainer.safetensors")
    assert lorafit.load_lora(pipe, lora / "test.safetensors") == "test"
    assert lorafit.load_lora(pipe, foreign, weight=0.7) == "other_trainer"
    assert lorafit.loaded_loras(pipe) == {"test": 1.0, "other_trainer": 0.7}

    truth = merge_into(merge_into(pipeline(tiny_models[family]), lora / "test.safetensors"), foreign, strength=0.7)
    assert (unet_output(pipe.unet) - unet_output(truth.unet)).abs().max() < 1e-4
    for got, want in zip(text_outputs(pipe), text_outputs(truth)):
        assert (got - want).abs().max() < 1e-4

    lorafit.unload_lora(pipe, "other_trainer")  # the other one keeps working alone
    alone = merge_into(pipeline(tiny_models[family]), lora / "test.safetensors")
    assert (unet_output(pipe.unet) - unet_output(alone.unet)).abs().max() < 1e-4


def test_diffusers_own_loader_gets_per_module_alphas_wrong(trained, tiny_models, tmp_path):
    """Why load_lora exists: the same foreign file through diffusers 0.42's kohya path is off."""
    family, _, _ = trained
    pipe = pipeline(tiny_models[family])
    foreign = _foreign_kohya_file(pipe, family, tmp_path / "foreign.safetensors")
    truth = unet_output(merge_into(pipeline(tiny_models[family]), foreign).unet)
    lorafit.load_lora(pipe, foreign)
    assert (unet_output(pipe.unet) - truth).abs().max() < 1e-4
    theirs = pipeline(tiny_models[family])
    theirs.load_lora_weights(str(foreign))
    assert (unet_output(theirs.unet) - truth).abs().max() > 1e-3


def test_one_line_errors(trained, tiny_models):
    family, lora, _ = trained
    pipe = pipeline(tiny_models[family])
    lorafit.load_lora(pipe, lora / "test.safetensors")
    with pytest.raises(LorafitError, match="already loaded"):
        lorafit.load_lora(pipe, lora / "test.safetensors")
    with pytest.raises(LorafitError, match="no LoRA named 'nope'"):
        lorafit.set_lora_weight(pipe, "nope", 0.5)
    other = pipeline(tiny_models["sd1" if family == "sdxl" else "sdxl"])
    with pytest.raises(LorafitError, match="names no module of this base model"):
        lorafit.load_lora(other, lora / "test.safetensors")
