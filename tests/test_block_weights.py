"""Block-weight strength (A1111's LoRA Block Weight): per-block scales on the loaded adapters, the
extension's block map and formats, and the ``--lora ...:lbw=`` / ``grid --lbw`` spellings.

The reference is the extension's own rule (sd-webui-lora-block-weight, ``ratiodealer``): a module
belongs to the last of its ``BLOCKS`` names found in the module's A1111 key, ``BASE`` for the text
encoders, and modules in none keep the strength. Vectors shorter than 26 values are spread over
the 26 blocks by name (``to26``), unlisted blocks 0. The loaded pipeline's outputs are compared
with the base weights patched by hand with ``strength x ratio x (W' - W)`` for every module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from network_reference import merge_into, pipeline, text_outputs
from PIL import Image
from test_load_lora import _foreign_kohya_file
from training import train, unet_output

import lorafit
from lorafit.cli import main
from lorafit.errors import LorafitError
from lorafit.families.original_layout import unet_module_to_original
from lorafit.networks.block_weights import check_block_weights, parse_block_weights

BLOCKID26 = ["BASE", *[f"IN{i:02d}" for i in range(12)], "M00", *[f"OUT{i:02d}" for i in range(12)]]
BLOCKID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *[f"OUT{i:02d}" for i in range(3, 12)]]
BLOCKID20 = ["BASE", *[f"IN{i:02d}" for i in range(9)], "M00", *[f"OUT{i:02d}" for i in range(9)]]
# The extension's BLOCKS: key substrings, in BLOCKID26 order; the last two are text encoders (BASE).
EXTENSION_BLOCKS = [
    "encoder",
    *[f"diffusion_model_input_blocks_{i}_" for i in range(12)],
    "diffusion_model_middle_block_",
    *[f"diffusion_model_output_blocks_{i}_" for i in range(12)],
    "embedders",
    "transformer_resblocks",
]


def extension_ratio(component: str, module: str, unet_config, ratios26: list[float]) -> float:
    """The extension's ratio of one module, from its A1111 key (compvis names for the UNet)."""
    if component == "unet":
        key = "diffusion_model_" + unet_module_to_original(module, unet_config).replace(".", "_")
    else:
        key = f"{component}_text_model_encoder_{module.replace('.', '_')}"
    ratio = 1.0
    for index, block in enumerate(EXTENSION_BLOCKS):
        if block in key:
            ratio = ratios26[0 if index >= 26 else index]
    return ratio


def to26(values: list[float], ids: list[str]) -> list[float]:
    out = [0.0] * 26
    for block, value in zip(ids, values):
        out[BLOCKID26.index(block)] = value
    return out


@pytest.fixture(scope="module")
def dora_files(tiny_models, demo_data, tmp_path_factory):
    """A DoRA file per family: its strength goes through a forward hook, not PEFT's scale."""
    files = {}
    for family in ("sd1", "sdxl"):
        root = tmp_path_factory.mktemp(f"dora-{family}")
        train(tiny_models[family], demo_data, root, max_steps=2, network_type="dora", learning_rate=3e-2)
        files[family] = root / "lora" / "test.safetensors"
    return files


CASES = {
    # family: (spec, its 26 ratios)
    "sd1": ("0.3,1,0.5,0,2,1,0.7,0.4,1,0,0.5,1,1.5,0.8,1,0.2,1", BLOCKID17),
    "sdxl": ("0.5,1,0,0.3,1,0.6,1,2,0.2,0.9,1.1,0,0.4,1,0.7,1.3,0.5,1,0.8,0", BLOCKID20),
}


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_each_module_gets_strength_times_its_blocks_value(family, kind, tiny_models, dora_files, tmp_path):
    pipe = pipeline(tiny_models[family])
    path = _foreign_kohya_file(pipe, family, tmp_path / "x.safetensors") if kind == "lora" else dora_files[family]
    spec, ids = CASES[family]
    ratios = to26([float(v) for v in spec.split(",")], ids)
    config = pipe.unet.config
    lorafit.load_lora(pipe, path, weight=0.8, block_weights=spec)

    def strength(component, module):
        return 0.8 * extension_ratio(component, module, config, ratios)

    truth = merge_into(pipeline(tiny_models[family]), path, strength=strength)
    uniform = merge_into(pipeline(tiny_models[family]), path, strength=0.8)
    assert (unet_output(uniform.unet) - unet_output(truth.unet)).abs().max() > 1e-3, "the blocks change nothing"
    assert (unet_output(pipe.unet) - unet_output(truth.unet)).abs().max() < 1e-4
    for got, want in zip(text_outputs(pipe), text_outputs(truth)):
        assert (got - want).abs().max() < 1e-4
    # Back to one strength everywhere, and the blocks survive a change of strength.
    lorafit.set_block_weights(pipe, path.stem, None)
    assert (unet_output(pipe.unet) - unet_output(uniform.unet)).abs().max() < 1e-4
    lorafit.set_block_weights(pipe, path.stem, spec)
    lorafit.set_lora_weight(pipe, path.stem, 0.8)
    assert (unet_output(pipe.unet) - unet_output(truth.unet)).abs().max() < 1e-4


def test_presets_and_named_blocks(tiny_models, tmp_path):
    pipe = pipeline(tiny_models["sd1"])
    path = _foreign_kohya_file(pipe, "sd1", tmp_path / "x.safetensors")
    base = unet_output(pipe.unet), text_outputs(pipe)
    lorafit.load_lora(pipe, path, block_weights="NONE")  # the extension's preset: every block 0
    assert torch.equal(unet_output(pipe.unet), base[0])
    assert all(torch.equal(a, b) for a, b in zip(text_outputs(pipe), base[1]))
    # INALL = BASE and the input blocks, as its 17 values say; named blocks give the same here.
    inall = parse_block_weights("INALL", "sd1")
    assert [inall.values[b] for b in BLOCKID17] == [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    lorafit.set_block_weights(pipe, "x", "INALL")
    by_preset = unet_output(pipe.unet)
    lorafit.set_block_weights(pipe, "x", "MID=0,OUT=0")  # named blocks: the rest keep 1
    assert (unet_output(pipe.unet) - by_preset).abs().max() < 1e-6
    assert not torch.equal(by_preset, base[0])
    # Ranges follow the block order; MID is M00.
    ranged = parse_block_weights("ALL=1, IN10-MID = 0.5, OUT=0", "sd1")
    assert [b for b, v in ranged.values.items() if v == 0.5] == ["IN10", "IN11", "M00"]
    assert ranged.a1111() == "1," + "1," * 10 + "0.5,0.5,0.5," + ",".join(["0"] * 12)


def test_formats_each_family_reads(tiny_models):
    assert parse_block_weights("ALL0.5", "sd2").values["OUT11"] == 0.5
    assert parse_block_weights(",".join(["1"] * 26), "sd1").values["IN00"] == 1  # LyCORIS: every block
    assert parse_block_weights(",".join(["1"] * 17), "sd1").values["IN00"] == 0  # LoRA: IN00 unlisted
    assert parse_block_weights(",".join(["1"] * 12), "sdxl").values["OUT06"] == 0
    with pytest.raises(LorafitError, match=r"no such preset for sdxl .*or name blocks, IN=1,OUT=0"):
        parse_block_weights("OUTALL", "sdxl")  # the extension would zero OUT00-OUT02 on SDXL
    with pytest.raises(LorafitError, match=r"17 values; sdxl vectors have 12 \(BASE,IN04,IN05,\.\.\.\) or 20"):
        parse_block_weights(",".join(["1"] * 17), "sdxl")
    with pytest.raises(LorafitError, match="no block 'IN99'"):
        parse_block_weights("IN99=1", "sd1")
    with pytest.raises(LorafitError, match="'x' is not a number"):
        parse_block_weights("IN=x", "sd1")
    check_block_weights(",".join(["0"] * 12))  # some family reads it: fine before the model is known
    with pytest.raises(LorafitError, match="7 values"):
        check_block_weights("1,1,1,1,1,1,1")


def test_flux_blocks_by_double_and_single_ranges():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(
            num_layers=3,
            num_single_layers=4,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=16,
            in_channels=16,
            guidance_embeds=True,
        )
    weights = parse_block_weights("D=1, D01-D02=0.5, S=0, S03=2, IN=0.25, OUT=3", "flux")
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    factors = {name: weights.factor("transformer", name) for name in linears}
    assert factors["transformer_blocks.0.attn.to_q"] == 1 and factors["transformer_blocks.2.ff.net.2"] == 0.5
    assert (
        factors["single_transformer_blocks.1.proj_out"] == 0 and factors["single_transformer_blocks.3.attn.to_k"] == 2
    )
    assert factors["x_embedder"] == factors["context_embedder"] == 0.25
    assert factors["time_text_embed.guidance_embedder.linear_1"] == 0.25
    assert factors["proj_out"] == factors["norm_out.linear"] == 3
    assert weights.factor("text_encoder", "encoder.layers.0.mlp.fc1") == 1  # CLIP, not named: 1
    assert parse_block_weights(",".join(["0.5"] * 61), "flux").values["S37"] == 0.5


def test_generate_and_grid_spell_block_weights_like_a1111(tiny_models, tmp_path, capsys):
    model = tiny_models["sd1"]
    lora = _foreign_kohya_file(pipeline(model), "sd1", tmp_path / "style.safetensors")
    common = ["--render.steps", "2", "--render.seed", "4", "--base.device", "cpu"]
    main(
        [
            "generate",
            model,
            "--prompt",
            "a cat",
            "--lora",
            f"{lora}:0.8:lbw=INALL",
            *common,
            "--out",
            str(tmp_path / "g"),
        ]
    )
    (image,) = (tmp_path / "g").glob("*.png")
    assert "a cat <lora:style:0.8:lbw=INALL>\n" in Image.open(image).text["parameters"]
    grid = tmp_path / "grid"
    argv = ["grid", model, "--lora", str(lora), "--prompt", "a cat", "--lbw", "NONE", "--lbw", "IN=0.5,OUT=2"]
    main([*argv, "--strength", "0", "--strength", "1", "--x", "lbw", "--y", "strength", *common, "--out", str(grid)])

    def cell(strength: str, index: int) -> np.ndarray:
        return np.asarray(Image.open(grid / "cells" / f"style_s{strength}_lbw{index:02d}_p00_seed4_cfg7.png"))

    assert np.array_equal(cell("1", 0), cell("0", 1))  # every block at 0 is the base model
    assert not np.array_equal(cell("1", 1), cell("0", 1))
    parameters = Image.open(grid / "cells" / "style_s1_lbw01_p00_seed4_cfg7.png").text["parameters"]
    vector = ",".join(["1", *["0.5"] * 12, "1", *["2"] * 12])  # every block, BLOCKID26's order
    assert f"<lora:style:1:lbw={vector}>" in parameters
    with pytest.raises(SystemExit):
        main(["grid", model, "--lora", f"{lora}:0.5", "--prompt", "a cat", *common])
    assert "grid puts strengths and block weights on axes of their own" in capsys.readouterr().err
