"""Original (LDM/SGM) layout: UNet name map, kohya SDXL names, single-file checkpoints.

Everything is checked against diffusers' own readers of that layout (its single-file converters
and its kohya LoRA loader), on tiny real-weight models and on real-size models built on the meta
device (names and shapes, no weights), all offline.
"""

import shutil

import pytest
import torch

from lorafit.errors import LorafitError
from lorafit.families.original_checkpoint import original_state_dict, save_original_checkpoint
from lorafit.families.original_layout import (
    original_module_to_unet,
    original_unet_names,
    unet_module_to_original,
)
from lorafit.families.tiny import UNET_FAMILIES as FAMILIES
from lorafit.families.tiny import build_tiny_pipeline

SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)
# UNet2DConditionModel's defaults are SD1's layout; SD1 and SD2 differ in text width and projections.
SD1_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD2_UNET = dict(
    sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
)
CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    hidden_act="quick_gelu",
)
# SD2 keeps 23 of OpenCLIP ViT-H's 24 layers (it conditions on the penultimate one).
OPEN_CLIP_H = dict(
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, hidden_act="gelu"
)
OPEN_CLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    hidden_act="gelu",
    projection_dim=1280,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # conftest sets HF_HUB_OFFLINE before imports; this also holds if the environment said otherwise.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _meta_unet(**config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def _real_size_parts(family):
    """Real-architecture UNet, VAE and text encoder(s) of ``family`` on the meta device."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        )
        clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        if family == "sd1":
            return _meta_unet(**SD1_UNET), vae, clip_l, None
        if family == "sd2":
            return _meta_unet(**SD2_UNET), vae, CLIPTextModel(CLIPTextConfig(**OPEN_CLIP_H)), None
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP_BIGG))
        return _meta_unet(**SDXL_UNET), vae, clip_l, big_g


def test_sdxl_names_match_kohya_sgm_paths():
    config = _meta_unet(**SDXL_UNET).config
    expected = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
        ),
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2": ("output_blocks.2.1.transformer_blocks.9.ff.net.2"),
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in.weight": "input_blocks.0.0.weight",
        "conv_out": "out.2",
    }
    for name, original in expected.items():
        assert unet_module_to_original(name, config) == original
        assert original_module_to_unet(original, config) == name


@pytest.mark.parametrize(
    "config",
    [SDXL_UNET, SD1_UNET, dict(SD1_UNET, layers_per_block=(1, 2, 3, 1))],
    ids=["sdxl", "sd1", "per-level-layers"],
)
def test_name_map_is_one_to_one_and_covers_every_weight(config):
    unet = _meta_unet(**config)
    names = original_unet_names(unet)
    assert len(set(names.values())) == len(names)
    modules = unet.named_modules()
    holders = {name for name, module in modules if any(True for _ in module.parameters(recurse=False))}
    assert holders <= set(names)
    for name, original in names.items():
        assert original_module_to_unet(original, unet.config) == name


def test_names_without_original_counterpart_raise():
    config = _meta_unet(**SDXL_UNET).config
    # A level's container, a weightless module, a resnet's shared SiLU, the last level's (absent) upsampler.
    names = ("down_blocks.1", "time_proj", "down_blocks.0.resnets.0.nonlinearity", "up_blocks.2.upsamplers.0")
    for name in names:
        with pytest.raises(LorafitError):
            unet_module_to_original(name, config)
    with pytest.raises(LorafitError):
        original_module_to_unet("input_blocks.99.1.proj_in", config)
    with pytest.raises(LorafitError):
        unet_module_to_original("conv_in", dict(config, down_block_types=("AttnDownBlock2D",) * 3))


@pytest.mark.parametrize(
    "family, model_type, keys",
    [
        (
            "sd1",
            "v1",
            {
                "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
                "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
                "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
                "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
                "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
                "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
            },
        ),
        (
            "sd2",
            "v2",
            {
                "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
                "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
                "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
                "cond_stage_model.model.positional_embedding": (77, 1024),
                "cond_stage_model.model.ln_final.weight": (1024,),
            },
        ),
        (
            "sdxl",
            "xl_base",
            {
                "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
                "model.diffusion_model.input_blocks.6.0.op.weight": (640, 640, 3, 3),
                "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
                "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
                "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
                "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
                "conditioner.embedders.1.model.text_projection": (1280, 1280),
            },
        ),
    ],
)
def test_real_size_layout_is_what_diffusers_reads(family, model_type, keys):
    from diffusers.loaders import single_file_utils as sfu

    unet, vae, text_encoder, text_encoder_2 = _real_size_parts(family)
    state = original_state_dict(unet, vae, text_encoder, text_encoder_2)
    assert sfu.infer_diffusers_model_type(state) == model_type
    for key, shape in keys.items():
        assert tuple(state[key].shape) == shape, key

    def same_layout(converted, model):
        if not hasattr(model, "text_model"):  # transformers 5's flattened CLIPTextModel
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        shapes = {k: tuple(v.shape) for k, v in converted.items()}
        assert shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}

    same_layout(sfu.convert_ldm_unet_checkpoint(state, unet.config), unet)
    same_layout(sfu.convert_ldm_vae_checkpoint(state, vae.config), vae)
    if family == "sd2":
        same_layout(sfu.convert_open_clip_checkpoint(text_encoder, state), text_encoder)
    else:
        same_layout(sfu.convert_ldm_clip_checkpoint(state), text_encoder)
    if text_encoder_2 is not None:
        prefix = "conditioner.embedders.1.model."
        same_layout(sfu.convert_open_clip_checkpoint(text_encoder_2, state, prefix=prefix), text_encoder_2)


def _kohya_lora(unet, rank=1):
    """A kohya-style SDXL LoRA (SGM names) on every Linear/Conv2d of ``unet``: {module: down weight}."""
    modules = dict(unet.named_modules())
    state, downs = {}, {}
    for name, original in original_unet_names(unet).items():
        module = modules[name]
        if isinstance(module, torch.nn.Linear):
            down, up = torch.randn(rank, module.in_features), torch.randn(module.out_features, rank)
        elif isinstance(module, torch.nn.Conv2d):
            down = torch.randn(rank, module.in_channels, *module.kernel_size)
            up = torch.randn(module.out_channels, rank, 1, 1)
        else:
            continue
        stem = "lora_unet_" + original.replace(".", "_")
        state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"] = down, up
        state[f"{stem}.alpha"] = torch.tensor(1.0)
        downs[name] = down
    return state, downs


def test_kohya_sgm_lora_loads_onto_the_named_modules():
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = build_tiny_pipeline("sdxl")
    state, downs = _kohya_lora(pipe.unet)
    pipe.load_lora_weights(state)
    modules = dict(pipe.unet.named_modules())
    adapted = {name for name, module in modules.items() if isinstance(module, BaseTunerLayer)}
    assert adapted == set(downs)
    for name, down in downs.items():
        # The exact down weight proves placement: to_q and to_k have the same shape.
        (lora_a,) = modules[name].lora_A.values()
        assert torch.equal(lora_a.weight, down), name
    with pytest.raises(LorafitError, match="LoRA"):
        original_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)


def test_kohya_sgm_names_agree_with_diffusers_for_real_sdxl():
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    unet = _meta_unet(**SDXL_UNET)
    modules = dict(unet.named_modules())
    lora_types = (torch.nn.Linear, torch.nn.Conv2d)
    targets = {name for name in original_unet_names(unet) if isinstance(modules[name], lora_types)}
    state = {}
    for name in targets:
        stem = "lora_unet_" + unet_module_to_original(name, unet.config).replace(".", "_")
        state |= {f"{stem}.lora_down.weight": torch.zeros(1), f"{stem}.lora_up.weight": torch.zeros(1)}
    # The loader's own path: SGM block remap, kohya key conversion, then the PEFT names it injects.
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert {k.split(".lora_A")[0] for k in peft if ".lora_A" in k} == targets


def _sdxl_with_distinct_text_widths():
    """Tiny SDXL whose OpenCLIP encoder is wider than its CLIP-L one, as in the real model.

    diffusers' single-file reader picks the embedder for each text encoder by comparing the
    stored position-embedding width with the encoder's hidden size (CLIP-L first). With equal
    widths it loads CLIP-L's weights into ``text_encoder_2`` and leaves its ``text_projection``
    on the meta device, without an error. Once ``tiny.py`` gives the encoders different widths
    its pipeline is used as it is.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    pipe = build_tiny_pipeline("sdxl")
    width_1 = pipe.text_encoder.config.hidden_size
    if pipe.text_encoder_2.config.hidden_size != width_1:
        return pipe
    width_2 = width_1 + pipe.text_encoder_2.config.num_attention_heads * 4
    config_2 = CLIPTextConfig(**{**pipe.text_encoder_2.config.to_dict(), "hidden_size": width_2})
    text_encoder_2 = CLIPTextModelWithProjection(config_2)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": width_1 + width_2})
    return StableDiffusionXLPipeline(**{**pipe.components, "text_encoder_2": text_encoder_2, "unet": unet})


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip_through_diffusers(family, tiny_models, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe_dir = tiny_models[family]
    if family == "sdxl":
        pipe_dir = tmp_path / "pipe"
        _sdxl_with_distinct_text_widths().save_pretrained(pipe_dir)
    pipe = cls.from_pretrained(pipe_dir, local_files_only=True)
    # A config-only copy: with weights beside the configs, diffusers would quietly take a part it
    # cannot find in the single file from there, and the test would prove nothing.
    weights = shutil.ignore_patterns("*.safetensors", "*.bin")
    shutil.copytree(pipe_dir, tmp_path / "config", ignore=weights)
    path = save_original_checkpoint(pipe, tmp_path / "model.safetensors")

    loaded = cls.from_single_file(str(path), config=str(tmp_path / "config"), local_files_only=True)
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for part in parts:
        want, got = getattr(pipe, part).state_dict(), getattr(loaded, part).state_dict()
        assert want.keys() == got.keys(), part
        for key, tensor in want.items():
            assert not got[key].is_meta and torch.equal(got[key], tensor), f"{part}.{key}"
