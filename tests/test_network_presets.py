"""Target presets, include/exclude regexes and per-module rank/alpha, on the tiny UNets (no training)."""

from __future__ import annotations

import pytest
import torch

from lorafit.errors import LorafitError
from lorafit.networks.network_types import NetworkSpec, module_rank_alpha, network_config
from lorafit.networks.presets import preset_modules, select_modules


@pytest.fixture(scope="module")
def unets(tiny_models):
    from diffusers import UNet2DConditionModel

    return {
        family: UNet2DConditionModel.from_pretrained(tiny_models[family], subfolder="unet")
        for family in ("sd1", "sdxl")
    }


_ATTENTION = (".to_q", ".to_k", ".to_v", ".to_out.0")
_TRANSFORMER = _ATTENTION + (".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out")


def _suffixes(names, suffixes) -> set[str]:
    """Which of ``suffixes`` the names end in; fails if a name ends in none."""
    found = set()
    for name in names:
        matched = [s for s in suffixes if name.endswith(s)]
        assert matched, f"{name} is outside the expected set"
        found.update(matched)
    return found


def test_attn_preset_is_the_attention_projections(unets):
    names = preset_modules(unets["sdxl"], "attn")
    assert _suffixes(names, _ATTENTION) == set(_ATTENTION)
    assert "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k" in names  # 2 layers deep in SDXL level 1


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_attn_mlp_preset_is_kohyas_transformer_linears(unets, family):
    unet = unets[family]
    names = preset_modules(unet, "attn-mlp")
    assert _suffixes(names, _TRANSFORMER) == set(_TRANSFORMER)
    modules = dict(unet.named_modules())
    proj_in = next(n for n in names if n.endswith("proj_in"))
    # SD1's proj_in/proj_out are 1x1 convs; kohya's networks.lora trains them with the linears.
    assert isinstance(modules[proj_in], torch.nn.Conv2d if family == "sd1" else torch.nn.Linear)
    assert not any("resnets" in n or n.startswith("conv_") for n in names)


def test_full_preset_adds_resnets_samplers_conv_in_out_and_time_embedding(unets):
    unet = unets["sd1"]
    full = preset_modules(unet, "full")
    assert preset_modules(unet, "attn-mlp") < full
    for name in (
        "conv_in",
        "conv_out",
        "time_embedding.linear_1",
        "time_embedding.linear_2",
        "down_blocks.0.resnets.0.conv1",
        "down_blocks.0.resnets.0.time_emb_proj",
        "down_blocks.1.resnets.0.conv_shortcut",
        "down_blocks.0.downsamplers.0.conv",
        "up_blocks.0.upsamplers.0.conv",
    ):
        assert name in full
    locon = preset_modules(unet, "attn", with_conv_blocks=True)
    assert (
        "down_blocks.0.resnets.0.conv2" in locon
        and "conv_in" not in locon
        and "up_blocks.1.attentions.0.proj_in" not in locon
    )


def test_include_and_exclude_regexes(unets):
    unet = unets["sd1"]
    chosen = select_modules(
        unet, preset_modules(unet, "attn"), include=[r"ff\.net\.2", "conv_in"], exclude=[r"up_blocks\..*", "to_k"]
    )
    assert "conv_in" in chosen and "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2" in chosen
    assert not any(n.startswith("up_blocks.") or n.endswith(".to_k") for n in chosen)
    # Suffix lists and one full-match regex keep PEFT's meaning of target_modules.
    assert set(select_modules(unet, ["to_q"])) == {n for n in preset_modules(unet, "attn") if n.endswith("to_q")}
    assert set(select_modules(unet, r".*attn2\.to_v")) == {
        n for n in preset_modules(unet, "attn") if n.endswith("attn2.to_v")
    }


def test_bad_targets_are_one_line_errors(unets):
    unet = unets["sd1"]
    with pytest.raises(LorafitError, match="model.include: '\\(' is not a valid regex"):
        select_modules(unet, preset_modules(unet, "attn"), include=["("])
    with pytest.raises(LorafitError, match="no module of UNet2DConditionModel is selected"):
        select_modules(unet, preset_modules(unet, "attn"), exclude=[".*"])
    with pytest.raises(LorafitError, match="network.preset: 'all' is not one of"):
        preset_modules(unet, "all")
    with pytest.raises(LorafitError, match="network_type: 'lycoris' is not one of"):
        NetworkSpec(network_type="lycoris").check()


def test_rank_and_alpha_per_module(unets):
    modules = dict(unets["sd1"].named_modules())
    spec = NetworkSpec(
        "locon",
        rank=8,
        alpha=4.0,
        conv_rank=2,
        conv_alpha=1.0,
        rank_pattern={r"up_blocks\.1\..*": 16},
        alpha_pattern={r"ff\.net\.2": 0.5},
    )
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    conv = "down_blocks.0.resnets.0.conv1"
    assert module_rank_alpha(spec, q, modules[q]) == (8, 4.0)
    assert module_rank_alpha(spec, conv, modules[conv]) == (2, 1.0)  # 3x3 conv: conv_rank/conv_alpha
    shortcut = "down_blocks.1.resnets.0.conv_shortcut"
    assert module_rank_alpha(spec, shortcut, modules[shortcut]) == (8, 4.0)  # 1x1 conv counts as linear
    up = "up_blocks.1.resnets.0.conv1"
    assert module_rank_alpha(spec, up, modules[up]) == (16, 1.0)  # pattern rank wins over conv_rank
    ff = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    assert module_rank_alpha(spec, ff, modules[ff]) == (8, 0.5)
    # alpha left empty: alpha = each module's own rank (scale 1); conv_alpha empty = conv_rank.
    plain = NetworkSpec("locon", rank=8, conv_rank=2, rank_pattern={r"up_blocks\.1\..*": 16})
    assert module_rank_alpha(plain, up, modules[up]) == (16, 16.0)
    assert module_rank_alpha(plain, conv, modules[conv]) == (2, 2.0)


@pytest.mark.parametrize("network_type", ["lora", "locon", "loha", "lokr", "dora"])
def test_injected_layers_carry_each_modules_rank_and_alpha(unets, network_type):
    from diffusers import UNet2DConditionModel

    from lorafit.networks.adapters import ADAPTER_NAME, add_network
    from lorafit.networks.peft_layers import adapter_layers

    unet = UNet2DConditionModel.from_config(unets["sd1"].config)
    targets = select_modules(unet, preset_modules(unet, "attn", with_conv_blocks=True))
    spec = NetworkSpec(network_type, rank=4, alpha=2.0, conv_rank=2, rank_pattern={r"to_v": 6})
    count = add_network(unet, network_config(spec, targets), "test")
    layers = adapter_layers(unet, ADAPTER_NAME)
    assert count == len(targets) == len(layers)
    for name, layer in layers.items():
        rank, alpha = module_rank_alpha(spec, name, targets[name])
        assert layer.r[ADAPTER_NAME] == rank
        assert layer.scaling[ADAPTER_NAME] == pytest.approx(alpha / rank)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(any(t in n for t in (".lora_", ".hada_", ".lokr_")) for n in trainable)
