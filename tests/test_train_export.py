"""Train each family briefly, then reload the exported files in diffusers and compare outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from training import train, unet_output

RANK, ALPHA = 4, 2.0  # rank != alpha, so a file that loses alpha reloads with the wrong scale


def _pipeline(model_dir: str):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model_dir)


@torch.no_grad()
def _text_outputs(text_encoders, tokenizer) -> list[torch.Tensor]:
    ids = tokenizer(["ohwx star, a yellow star"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    return [encoder(ids, output_hidden_states=True).hidden_states[-2] for encoder in text_encoders]


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def trained(request, tiny_models, demo_data, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"run-{family}")
    before = {k: v.clone() for k, v in _pipeline(tiny_models[family]).unet.state_dict().items()}
    _trainer, module = train(
        tiny_models[family],
        demo_data,
        root,
        max_epochs=2,
        rank=RANK,
        alpha=ALPHA,
        learning_rate=1e-2,
        train_text_encoder=True,
    )
    return family, root, module, before


def test_per_epoch_files_in_both_formats(trained):
    _family, root, _module, _ = trained
    lora = root / "lora"
    for stem in ("test-epoch-001", "test-epoch-002", "test"):
        assert (lora / f"{stem}.safetensors").is_file()
        assert (lora / "diffusers" / f"{stem}.safetensors").is_file()
    assert not list(lora.rglob("*.tmp")), "atomic writes left temporary files behind"


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_exported_lora_reproduces_training_model_in_diffusers(trained, tiny_models, fmt):
    family, root, module, _ = trained
    path = root / "lora" / ("diffusers/test.safetensors" if fmt == "diffusers" else "test.safetensors")
    expected_unet = unet_output(module.unet)
    expected_text = _text_outputs(list(module.text_encoders), module.base.tokenizers[0])

    pipe = _pipeline(tiny_models[family])
    base_unet = unet_output(pipe.unet)
    pipe.load_lora_weights(str(path))
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])

    assert (base_unet - expected_unet).abs().max() > 1e-3, "training changed nothing; the comparison proves nothing"
    assert (unet_output(pipe.unet) - expected_unet).abs().max() < 1e-4
    for got, want in zip(_text_outputs(text_encoders, pipe.tokenizer), expected_text):
        assert (got - want).abs().max() < 1e-4


def test_kohya_keys_alpha_and_metadata(trained):
    family, root, _module, _ = trained
    with safe_open(str(root / "lora" / "test.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert alphas == {ALPHA}
    assert all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)
    if family == "sdxl":
        # SGM block names, as A1111/ComfyUI expect; CLIP-L is te1 and bigG is te2.
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
        assert not any("down_blocks" in k for k in keys)
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
        assert "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in keys
        assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    else:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
        assert metadata["ss_base_model_version"] == {"sd1": "sd_v1", "sd2": "sd_v2"}[family]
    assert metadata["ss_v_parameterization"] == str(family == "sd2")
    assert metadata["ss_network_dim"] == str(RANK) and metadata["ss_network_alpha"] == "2"
    assert metadata["ss_epoch"] == "2" and int(metadata["ss_steps"]) > 0
    assert json.loads(metadata["ss_tag_frequency"])  # captions' tags, as kohya records them
    assert metadata["modelspec.architecture"].endswith("/lora")


def test_diffusers_file_carries_alpha(trained):
    _, root, _, _ = trained
    with safe_open(str(root / "lora" / "diffusers" / "test.safetensors"), framework="pt") as f:
        packed = json.loads(f.metadata()["lora_adapter_metadata"])
    assert packed["unet.r"] == RANK and packed["unet.lora_alpha"] == ALPHA


def test_frozen_base_weights_unchanged(trained):
    _, _, module, before = trained
    after = {k.replace("base_layer.", ""): v for k, v in module.unet.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(not p.requires_grad for n, p in module.named_parameters() if "lora_" not in n)
