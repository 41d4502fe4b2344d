"""Base models load from a directory, a hub id (offline cache) and a single file; family is detected."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from lorafit.errors import LorafitError
from lorafit.families.loading import load_base_model, resolve_model_source

EXPECTED = {"sd1": ("sd1", "epsilon"), "sd2": ("sd2", "v_prediction"), "sdxl": ("sdxl", "epsilon")}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_family_and_prediction_type_detected_from_parts(tiny_models, family):
    base = load_base_model(tiny_models[family])
    assert (base.family, base.prediction_type) == EXPECTED[family]
    assert len(base.text_encoders) == (2 if family == "sdxl" else 1)
    frozen = [base.unet, base.vae, *base.text_encoders]
    assert all(not p.requires_grad for module in frozen for p in module.parameters())


def test_flags_override_detection(tiny_models, caplog):
    base = load_base_model(tiny_models["sd1"], family="sd2", prediction_type="v_prediction")
    assert (base.family, base.prediction_type) == ("sd2", "v_prediction")
    assert "overrides the detected family sd1" in caplog.text


def test_hub_id_loads_from_offline_cache(tiny_models, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache layout, exactly as a downloaded model would."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--lorafit--tiny-sd1" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_models["sd1"], snapshot)
    (cache / "models--lorafit--tiny-sd1" / "refs").mkdir()
    (cache / "models--lorafit--tiny-sd1" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert resolve_model_source("lorafit/tiny-sd1") == "hub_id"
    base = load_base_model("lorafit/tiny-sd1")
    reference = load_base_model(tiny_models["sd1"])
    assert base.family == "sd1"
    assert all(torch.equal(a, b) for a, b in zip(base.unet.state_dict().values(), reference.unet.state_dict().values()))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_checkpoint_loads_with_local_config(tiny_models, tmp_path, family):
    from diffusers import DiffusionPipeline

    from lorafit.families.original_checkpoint import save_original_checkpoint

    pipe = DiffusionPipeline.from_pretrained(tiny_models[family])
    path = save_original_checkpoint(pipe, tmp_path / "model.safetensors")
    # Configs only: a directory without weights proves the weights come from the single file.
    config_dir = tmp_path / "config"
    shutil.copytree(tiny_models[family], config_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    base = load_base_model(str(path), single_file_config=str(config_dir))
    assert (base.family, base.prediction_type) == EXPECTED[family]
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(base.unet.state_dict()[name], tensor), name


@pytest.fixture(scope="module")
def sd2_with_24_text_layers(tiny_models, tmp_path_factory):
    """A tiny SD2 pipeline whose OpenCLIP-style text encoder has 24 layers, as SD2's has before diffusers
    drops the last; its single file with all 24 blocks, and a config folder per layer count."""
    import json

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from lorafit.families.original_checkpoint import save_original_checkpoint

    root = tmp_path_factory.mktemp("sd2-24")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd2"], safety_checker=None)
    config = pipe.text_encoder.config
    config.num_hidden_layers = 24
    torch.manual_seed(0)
    pipe.text_encoder = CLIPTextModel(config).eval()
    full = save_original_checkpoint(pipe, root / "sd2-full.safetensors")
    configs = {}
    for layers in (23, 24):
        folder = root / f"config-{layers}"
        shutil.copytree(tiny_models["sd2"], folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        text_config = folder / "text_encoder" / "config.json"
        text_config.write_text(json.dumps({**json.loads(text_config.read_text()), "num_hidden_layers": layers}))
        configs[layers] = str(folder)
    return pipe, full, configs


def _without(source, target, fragment: str):
    from safetensors.torch import load_file, save_file

    save_file({k: v for k, v in load_file(str(source)).items() if fragment not in k}, str(target))
    return str(target)


def _sd2_conditioning(encoder, ids):
    from lorafit.families.clip_text import encode_tokens

    with torch.no_grad():
        return encode_tokens("sd2", [encoder], [ids]).hidden_states


def test_sd2_single_files_without_the_last_openclip_block_load_with_the_penultimate_conditioning(
    sd2_with_24_text_layers, tmp_path
):
    pipe, full, configs = sd2_with_24_text_layers
    cut = _without(full, tmp_path / "sd2-no-resblock-23.safetensors", "resblocks.23.")
    ids = pipe.tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():  # A1111 / ComfyUI: the penultimate hidden state of all 24 layers, final layer norm
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        penultimate = pipe.text_encoder.final_layer_norm(hidden)
    for file, layers in [(cut, 23), (full, 23), (cut, 24), (full, 24)]:
        base = load_base_model(file, single_file_config=configs[layers])
        (encoder,) = base.text_encoders
        assert encoder.config.num_hidden_layers == 23 == len(encoder.encoder.layers), (file, layers)
        assert torch.allclose(_sd2_conditioning(encoder, ids), penultimate, atol=1e-5), (file, layers)


def test_a_single_file_missing_weights_the_model_uses_is_refused_in_one_line(sd2_with_24_text_layers, tmp_path):
    _, full, configs = sd2_with_24_text_layers
    gap = _without(full, tmp_path / "sd2-no-resblock-10.safetensors", "resblocks.10.")
    with pytest.raises(LorafitError, match=r"has no weights for \d+ tensor\(s\) of the text_encoder") as error:
        load_base_model(gap, single_file_config=configs[23])
    assert "encoder.layers.10." in str(error.value) and "\n" not in str(error.value)


def test_bad_model_paths_fail_with_one_line(tmp_path):
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path): "not a diffusers pipeline (no model_index.json)",
        "./relative/missing": "does not exist",
    }
    (tmp_path / "notes.txt").write_text("x")
    cases[str(tmp_path / "notes.txt")] = "not a checkpoint"
    for source, message in cases.items():
        with pytest.raises(LorafitError, match=re.escape(message)) as error:
            resolve_model_source(source)
        assert "\n" not in str(error.value)
        assert "model.model" in str(error.value)
