"""Qwen-Image, Z-Image, FLUX.2 [klein], Chroma and SD3.5 end to end on tiny random-weight pipelines of the real classes:
detection, the prediction their pipelines step with, native single files, training every network type,
both export formats, and reloading them in lorafit, in diffusers and as ComfyUI maps them."""

from __future__ import annotations

import pytest
import torch
from family_reference import NEW_FAMILIES, denoiser_output, diffusers_from_native, native_state_dict
from flux_reference import comfy_merge, write_lora_file
from safetensors.torch import load_file
from training import train

import lorafit
from lorafit.errors import LorafitError
from lorafit.families.family import TextOptions
from lorafit.families.flux import pack_latents, unpack_latents
from lorafit.families.loading import load_base_model
from lorafit.families.registry import get_family

TRANSFORMERS = {
    "qwen-image": ("QwenImageTransformer2DModel", "Qwen2_5_VLForConditionalGeneration"),
    "z-image": ("ZImageTransformer2DModel", "Qwen3Model"),
    "flux2-klein": ("Flux2Transformer2DModel", "Qwen3ForCausalLM"),
    "chroma": ("ChromaTransformer2DModel", "T5EncoderModel"),
    "sd3": ("SD3Transformer2DModel", "CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"),
}
# What each family's kohya/ComfyUI file must name (musubi-tuner's and ComfyUI's layouts).
KOHYA_STEMS = {
    "qwen-image": ("lora_unet_transformer_blocks_0_attn_to_q", "lora_unet_transformer_blocks_1_attn_add_v_proj"),
    "z-image": ("lora_unet_layers_0_attention_qkv", "lora_unet_layers_1_attention_out"),
    "flux2-klein": ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1"),
    "chroma": ("lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_single_blocks_1_linear1"),
    "sd3": ("lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn2_qkv"),
}
# diffusers' load_lora_weights reads the kohya file of these families only at full size (Chroma: FLUX.1's reader,
# which hard-codes the released width; test_chroma checks it there) or not at all (SD3: no kohya reader).
NO_TINY_KOHYA_IN_DIFFUSERS = ("chroma", "sd3")


def _pipeline(family: str, directory: str):
    return get_family(family).pipeline_type().from_pretrained(directory)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_a_pipeline_directory_is_detected_as_its_family_with_a_flow_objective(family_models, family):
    base = load_base_model(family_models[family])
    transformer, *text_encoders = TRANSFORMERS[family]
    assert (base.family, base.prediction_type, type(base.denoiser).__name__) == (family, "flow", transformer)
    assert [type(e).__name__ for e in base.text_encoders] == text_encoders


def _one_pipeline_step(family: str, pipe, noise: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the latents after the pipeline's first Euler step from ``noise``, the scheduler's sigmas)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    # No terminal stretch: with one step it would move the sigma to Qwen-Image's 0.02.
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift_terminal=None)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="ohwx star", height=64, width=64, num_inference_steps=1, sigmas=[sigma], output_type="latent")
    if family == "qwen-image":
        out = pipe(**kwargs, latents=pack_latents(noise), true_cfg_scale=1.0).images
        out = unpack_latents(out, *noise.shape[-2:])
    elif family == "z-image":
        out = pipe(**kwargs, latents=noise, guidance_scale=0.0).images
    elif family == "sd3":
        out = pipe(**kwargs, latents=noise, guidance_scale=1.0).images
    elif family == "chroma":  # as lorafit's samples call it: the pipeline's encoding, its mask as bool
        spec = get_family(family)
        encoded = spec.encode_sample_arguments(pipe, spec.sample_arguments(kwargs.pop("prompt"), "", 1.0, None), "cpu")
        out = unpack_latents(pipe(**kwargs, **encoded, latents=pack_latents(noise)).images, *noise.shape[-2:])
    else:  # FLUX.2 takes patchified latents in and gives denormalised VAE latents out
        from lorafit.families.flux2 import patchify

        out = get_family(family).normalize_latents(
            pipe.vae, pipe(**kwargs, latents=patchify(noise), guidance_scale=1.0).images
        )
    return out, pipe.scheduler.sigmas


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_the_training_prediction_is_the_velocity_the_pipeline_steps_with(family_models, family):
    """One Euler step of the family's own pipeline equals noise + (s1 - s0) * the training prediction:
    timestep convention (Z-Image's 1 - sigma and negated output), packing and conditioning agree."""
    from lorafit.families.family import BaseModel

    pipe = _pipeline(family, family_models[family])
    spec = get_family(family)
    noise = torch.randn(1, spec.latent_channels(pipe.vae), 8, 8, generator=torch.Generator().manual_seed(3))
    stepped, sigmas = _one_pipeline_step(family, pipe, noise, 0.6)
    encoders = [getattr(pipe, name) for name in spec.text_encoder_components]
    base = BaseModel(
        family, "flow", pipe.transformer, pipe.vae, encoders, [getattr(pipe, n) for n in spec.tokenizer_components]
    )
    with torch.no_grad():
        conditioning = spec.encode_text(base, ["ohwx star"], TextOptions(), "cpu")
        velocity = spec.predict(base, noise, sigmas[:1], conditioning, {}, TextOptions())
    assert 0 < float(sigmas[0]) < 1
    torch.testing.assert_close(stepped, noise + (sigmas[1] - sigmas[0]) * velocity, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_native_single_files_load_as_the_same_model(family_models, family, tmp_path):
    """The transformer under ComfyUI's/BFL's names (as people download it) plus the text encoder as its own
    file load, through diffusers' single-file reader, into the model of the diffusers directory."""
    reference = _pipeline(family, family_models[family])
    native = native_state_dict(family, reference.transformer)
    expected = reference.transformer.state_dict()
    converted = diffusers_from_native(family, native, reference.transformer.config)  # the inverse of the reader
    assert converted.keys() == expected.keys() and all(torch.equal(converted[k], expected[k]) for k in expected)
    write_lora_file(tmp_path / "transformer.safetensors", native)
    text_encoder = reference.text_encoder.state_dict()
    text_encoder.pop("lm_head.weight", None)  # Qwen3's is tied to the input embeddings: files leave it out
    text_encoder.pop("shared.weight", None)  # T5 ties it to encoder.embed_tokens: ComfyUI's t5xxl files leave it out
    write_lora_file(tmp_path / "text_encoder.safetensors", text_encoder)
    base = load_base_model(
        str(tmp_path / "transformer.safetensors"),
        single_file_config=family_models[family],
        parts={"text_encoder": str(tmp_path / "text_encoder.safetensors")},
    )
    assert base.family == family
    torch.testing.assert_close(denoiser_output(family, base.denoiser), denoiser_output(family, reference.transformer))
    ids = torch.tensor([[5, 9, 14, 1]])
    with torch.no_grad():
        ours = base.text_encoders[0](ids, output_hidden_states=True).hidden_states[-1]
        theirs = reference.text_encoder(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(ours, theirs)


def test_single_file_errors_are_one_line(family_models, tmp_path):
    reference = _pipeline("qwen-image", family_models["qwen-image"])
    write_lora_file(tmp_path / "qwen.safetensors", native_state_dict("qwen-image", reference.transformer))
    with pytest.raises(LorafitError, match="model.single_file_config: a Qwen-Image single file needs"):
        load_base_model(str(tmp_path / "qwen.safetensors"))
    with pytest.raises(LorafitError, match="model.parts.vae: diffusers .* cannot read a Qwen-Image VAE single file"):
        load_base_model(
            str(tmp_path / "qwen.safetensors"),
            single_file_config=family_models["qwen-image"],
            parts={"vae": str(tmp_path / "vae.safetensors")},
        )
    with pytest.raises(LorafitError, match="model.parts: 'text_encoder_2' is no Qwen-Image part"):
        load_base_model(
            str(tmp_path / "qwen.safetensors"),
            single_file_config=family_models["qwen-image"],
            parts={"text_encoder_2": "x.safetensors"},
        )


def test_a_family_the_installed_diffusers_cannot_build_is_refused_in_one_line(tmp_path):
    from lorafit.families.z_image import ZImageFamily

    class FutureFamily(ZImageFamily):  # as if lorafit knew a pipeline this diffusers lacks
        pipeline_class = "ZImage9Pipeline"

    with pytest.raises(LorafitError, match=r"ZImage9Pipeline, which diffusers 0\.\d+\.\d+ lacks; upgrade diffusers"):
        FutureFamily().pipeline_type()


def test_flux2_dev_is_not_taken_for_klein(family_models, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(family_models["flux2-klein"], tmp_path / "flux2-dev")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "Flux2Pipeline"}))
    with pytest.raises(LorafitError, match="is a Flux2Pipeline, which lorafit does not train"):
        load_base_model(str(folder))


@pytest.fixture(scope="module")
def trained(family_models, demo_data, tmp_path_factory):
    """``trained(family, kind)``: (LoRA folder, the training model's denoiser output) of a 3-step run."""
    runs = {}

    def run(family: str, kind: str):
        if (family, kind) not in runs:
            root = tmp_path_factory.mktemp(f"{family}-{kind}")
            _, module = train(
                family_models[family],
                demo_data,
                root,
                max_steps=3,
                rank=4,
                alpha=2.0,
                learning_rate=1e-2,
                network_type=kind,
                conditioning={"max_sequence_length": 96},  # captions fit; FLUX.2 pads every caption to it
                export={"every_n_epochs": 0},
            )
            runs[family, kind] = (root / "lora", denoiser_output(family, module.transformer))
        return runs[family, kind]

    return run


CASES = [
    *((family, "lora") for family in NEW_FAMILIES),
    pytest.param("qwen-image", "loha", marks=pytest.mark.slow),
    pytest.param("z-image", "dora", marks=pytest.mark.slow),
    pytest.param("z-image", "lokr", marks=pytest.mark.slow),
    pytest.param("flux2-klein", "dora", marks=pytest.mark.slow),
    pytest.param("chroma", "dora", marks=pytest.mark.slow),
    pytest.param("chroma", "loha", marks=pytest.mark.slow),
    pytest.param("chroma", "lokr", marks=pytest.mark.slow),
    pytest.param("sd3", "dora", marks=pytest.mark.slow),
    pytest.param("sd3", "loha", marks=pytest.mark.slow),
    pytest.param("sd3", "lokr", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("family, kind", CASES)
def test_exported_files_reproduce_the_training_model_in_lorafit(trained, family_models, family, kind):
    lora, expected = trained(family, kind)
    files = ["test.safetensors"] + (["diffusers/test.safetensors"] if kind in ("lora", "dora") else [])
    assert (lora / "diffusers").exists() == (kind in ("lora", "dora"))  # diffusers has no LoHa/LoKr format
    for file in files:
        pipe = _pipeline(family, family_models[family])
        before = denoiser_output(family, pipe.transformer)
        lorafit.load_lora(pipe, lora / file)
        assert (before - expected).abs().max() > 1e-4, "training changed nothing; the comparison proves nothing"
        torch.testing.assert_close(denoiser_output(family, pipe.transformer), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_diffusers_own_loader_reproduces_both_files(trained, family_models, family):
    lora, expected = trained(family, "lora")
    files = ["diffusers/test.safetensors"] + (["test.safetensors"] if family not in NO_TINY_KOHYA_IN_DIFFUSERS else [])
    for file in files:
        pipe = _pipeline(family, family_models[family])
        pipe.load_lora_weights(str(lora / file))
        torch.testing.assert_close(denoiser_output(family, pipe.transformer), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_the_kohya_file_names_comfyuis_native_modules_and_merges_as_comfyui_does(trained, family_models, family):
    """ComfyUI maps ``lora_unet_`` + a native module path onto its weights (``comfy/lora.py``): merged
    that way into the native weights, read back by diffusers, the file reproduces the trained model."""
    lora, expected = trained(family, "lora")
    kohya = load_file(str(lora / "test.safetensors"))
    stems = {key.split(".")[0] for key in kohya}
    assert set(KOHYA_STEMS[family]) <= stems and all(stem.startswith("lora_unet_") for stem in stems)
    pipe = _pipeline(family, family_models[family])
    merged = comfy_merge(native_state_dict(family, pipe.transformer), kohya)
    pipe.transformer.load_state_dict(diffusers_from_native(family, merged, pipe.transformer.config))
    torch.testing.assert_close(denoiser_output(family, pipe.transformer), expected, rtol=1e-4, atol=1e-5)


def test_z_image_reads_musubi_and_ai_toolkit_files(trained, family_models, tmp_path):
    """musubi-tuner names Z-Image modules ``lora_unet_`` + the diffusers path (q/k/v apart), ai-toolkit
    ``diffusion_model.`` + the diffusers path: both load as the file lorafit wrote."""
    lora, expected = trained("z-image", "lora")
    musubi, toolkit = {}, {}
    for key, tensor in load_file(str(lora / "diffusers" / "test.safetensors")).items():
        module, part = key.removeprefix("transformer.").rsplit(".lora_", 1)
        kohya_part = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[part]
        musubi[f"lora_unet_{module.replace('.', '_')}.{kohya_part}"] = tensor
        musubi[f"lora_unet_{module.replace('.', '_')}.alpha"] = torch.tensor(2.0)  # trained at alpha 2
        toolkit[f"diffusion_model.{module}.lora_{part}"] = tensor
        toolkit[f"diffusion_model.{module}.alpha"] = torch.tensor(2.0)
    assert "lora_unet_layers_0_attention_to_q.lora_down.weight" in musubi
    for file, tensors in (("musubi.safetensors", musubi), ("toolkit.safetensors", toolkit)):
        pipe = _pipeline("z-image", family_models["z-image"])
        lorafit.load_lora(pipe, write_lora_file(tmp_path / file, tensors))
        torch.testing.assert_close(denoiser_output("z-image", pipe.transformer), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_presets_select_the_anchors_targets(family_models, family):
    transformer = _pipeline(family, family_models[family]).transformer
    spec = get_family(family)
    attn, attn_mlp, full = (spec.preset_modules(transformer, p) for p in ("attn", "attn-mlp", "full"))
    assert attn < attn_mlp < full
    assert not any("mod" in name.split(".")[-2] for name in attn_mlp if name.count(".") > 1)  # no modulation
    expected = {
        "qwen-image": ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.img_mlp.net.2"),
        "z-image": ("layers.0.attention.to_q", "layers.0.feed_forward.w2"),
        "flux2-klein": ("transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.ff.linear_in"),
        "chroma": ("single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"),
        "sd3": ("transformer_blocks.0.attn2.to_q", "transformer_blocks.0.ff.net.0.proj"),
    }[family]
    assert expected[0] in attn and expected[1] in attn_mlp - attn
    if family == "z-image":  # musubi-tuner leaves the refiners out
        assert not any("refiner" in name for name in attn_mlp) and "noise_refiner.0.attention.to_q" in full
    with pytest.raises(LorafitError, match="model.network.preset: 'everything'"):
        spec.preset_modules(transformer, "everything")


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_nf4_quantizes_the_transformer_on_a_gpu_and_is_refused_in_one_line_without(family_models, family):
    if not torch.cuda.is_available():
        with pytest.raises(LorafitError, match="model.quantization: nf4 needs a CUDA GPU"):
            load_base_model(family_models[family], quantization="nf4")
        return
    import bitsandbytes

    base = load_base_model(family_models[family], quantization="nf4", weight_dtype="bfloat16")
    assert any(isinstance(m, bitsandbytes.nn.Linear4bit) for m in base.denoiser.modules())


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_lorafit_convert_round_trips_the_kohya_file_exactly(trained, family_models, family, tmp_path):
    from lorafit.networks.convert import convert

    lora, _ = trained(family, "lora")
    original = load_file(str(lora / "test.safetensors"))
    base = family_models[family]
    convert(str(lora / "test.safetensors"), str(tmp_path / "diffusers.safetensors"), base=base)
    convert(str(tmp_path / "diffusers.safetensors"), str(tmp_path / "back.safetensors"), base=base, to="kohya")
    back = load_file(str(tmp_path / "back.safetensors"))
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)


def test_the_denoiser_and_vae_dtypes_follow_a_cast_without_walking_the_model_each_step(tiny_models, monkeypatch):
    """``BaseModel.denoiser_dtype``/``vae_dtype`` run every training step; diffusers' ``ModelMixin.dtype``
    walks every submodule, so it is asked again only when the weights were cast."""
    from diffusers.models.modeling_utils import ModelMixin

    base = load_base_model(tiny_models["sd1"])
    asked = []
    original = ModelMixin.dtype
    monkeypatch.setattr(
        ModelMixin, "dtype", property(lambda self: asked.append(type(self).__name__) or original.fget(self))
    )
    assert [base.denoiser_dtype() for _ in range(5)] == [torch.float32] * 5
    assert [base.vae_dtype() for _ in range(5)] == [torch.float32] * 5
    assert asked == ["UNet2DConditionModel", "AutoencoderKL"]
    base.denoiser.to(torch.bfloat16)
    base.vae.to(torch.float16)
    assert (base.denoiser_dtype(), base.vae_dtype()) == (torch.bfloat16, torch.float16)
    assert len(asked) == 4
    base.compute_dtype = torch.float32  # quantized / fp8 storage: the compute dtype wins
    assert base.denoiser_dtype() == torch.float32
