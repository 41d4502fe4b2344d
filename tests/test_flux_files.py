"""Flux LoRA files as other trainers write them load in lorafit exactly; `lorafit convert` goes both ways
for Flux; diffusers' own kohya-Flux converter reads lorafit's kohya files at the released size.

Each layout is a synthetic file written here from the trainer's key names (ai-toolkit, SimpleTuner,
SimpleTuner/LyCORIS, OneTrainer, kohya with block-diagonal and dense fused modules, ComfyUI's generic
``diffusion_model.`` layout). The truth is each diffusers module's update merged into a copy of the
tiny transformer by hand; the loaded pipeline must give the same output.
"""

from __future__ import annotations

import pytest
import torch
from flux_reference import flux_output, write_lora_file
from safetensors.torch import load_file

import lorafit
from lorafit.cli import main

# diffusers module -> (BFL module, index of its rows among the fused module's parts), for the modules
# the synthetic files cover (written out by hand from BFL's model, not from lorafit's table).
BFL = {
    "transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv", 0),
    "transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv", 1),
    "transformer_blocks.0.attn.to_v": ("double_blocks.0.img_attn.qkv", 2),
    "transformer_blocks.1.attn.add_q_proj": ("double_blocks.1.txt_attn.qkv", 0),
    "transformer_blocks.1.attn.add_k_proj": ("double_blocks.1.txt_attn.qkv", 1),
    "transformer_blocks.1.attn.add_v_proj": ("double_blocks.1.txt_attn.qkv", 2),
    "transformer_blocks.0.ff.net.0.proj": ("double_blocks.0.img_mlp.0", 0),
    "transformer_blocks.1.norm1_context.linear": ("double_blocks.1.txt_mod.lin", 0),
    "single_transformer_blocks.0.attn.to_q": ("single_blocks.0.linear1", 0),
    "single_transformer_blocks.0.attn.to_k": ("single_blocks.0.linear1", 1),
    "single_transformer_blocks.0.attn.to_v": ("single_blocks.0.linear1", 2),
    "single_transformer_blocks.0.proj_mlp": ("single_blocks.0.linear1", 3),
    "single_transformer_blocks.1.proj_out": ("single_blocks.1.linear2", 0),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", 0),  # BFL: (shift, scale); diffusers: (scale, shift)
    "x_embedder": ("img_in", 0),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", 0),
}
TEXT = "text_model.encoder.layers.1.self_attn.q_proj"  # CLIP-L, kohya's lora_te1


def _pipeline(model_dir: str):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(model_dir)


def _random(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.2


def _loras(transformer, scale_one: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(down, up, alpha) per module of BFL, ranks 1-3, alphas differing unless ``scale_one``."""
    loras = {}
    for index, name in enumerate(BFL):
        out, inner = transformer.get_submodule(name).weight.shape
        rank = 1 + index % 3
        alpha = float(rank) if scale_one else 0.5 + index % 4
        loras[name] = (_random(rank, inner, seed=index), _random(out, rank, seed=100 + index), alpha)
    return loras


def _deltas(loras: dict) -> dict[str, torch.Tensor]:
    return {name: alpha / down.shape[0] * up @ down for name, (down, up, alpha) in loras.items()}


@torch.no_grad()
def _truth(model_dir: str, deltas: dict[str, torch.Tensor], text_delta: torch.Tensor | None = None):
    pipe = _pipeline(model_dir)
    for name, delta in deltas.items():
        pipe.transformer.get_submodule(name).weight += delta
    if text_delta is not None:
        pipe.text_encoder.get_submodule(TEXT.removeprefix("text_model.")).weight += text_delta
    return pipe


@torch.no_grad()
def _pooled(pipe) -> torch.Tensor:
    return pipe.text_encoder(torch.tensor([[3, 9, 14, 1]])).pooler_output


def _assert_loads_as(model_dir: str, path, deltas: dict, text_delta: torch.Tensor | None = None):
    pipe = _pipeline(model_dir)
    before = flux_output(pipe.transformer)
    lorafit.load_lora(pipe, path)
    truth = _truth(model_dir, deltas, text_delta)
    expected = flux_output(truth.transformer)
    assert (expected - before).abs().max() > 1e-4, "the file changes nothing; the comparison proves nothing"
    torch.testing.assert_close(flux_output(pipe.transformer), expected, rtol=1e-4, atol=1e-5)
    if text_delta is not None:
        torch.testing.assert_close(_pooled(pipe), _pooled(truth), rtol=1e-4, atol=1e-5)


def _per_module_file(loras: dict, key, parts: tuple[str, str], alpha_keys: bool = True) -> dict:
    tensors = {}
    for name, (down, up, alpha) in loras.items():
        tensors[f"{key(name)}.{parts[0]}"], tensors[f"{key(name)}.{parts[1]}"] = down, up
        if alpha_keys:
            tensors[f"{key(name)}.alpha"] = torch.tensor(alpha)
    return tensors


def test_ai_toolkit_diffusers_keys_without_metadata(tiny_models, tmp_path):
    """ai-toolkit: transformer.<diffusers path>.lora_A/B, no metadata: diffusers reads alpha = rank."""
    loras = _loras(_pipeline(tiny_models["flux"]).transformer, scale_one=True)
    tensors = _per_module_file(loras, lambda n: f"transformer.{n}", ("lora_A.weight", "lora_B.weight"), False)
    _assert_loads_as(tiny_models["flux"], write_lora_file(tmp_path / "ait.safetensors", tensors), _deltas(loras))


def test_diffusers_keys_with_alpha_tensors(tiny_models, tmp_path):
    """Per-module .alpha beside PEFT names (files diffusers' Flux loader reads as network alphas)."""
    loras = _loras(_pipeline(tiny_models["flux"]).transformer)
    tensors = _per_module_file(loras, lambda n: f"transformer.{n}", ("lora_A.weight", "lora_B.weight"))
    _assert_loads_as(tiny_models["flux"], write_lora_file(tmp_path / "alpha.safetensors", tensors), _deltas(loras))


def test_simpletuner_diffusers_file_with_metadata(tiny_models, tmp_path):
    """SimpleTuner saves through diffusers' save_lora_weights with a LoraConfig per component."""
    import re

    from diffusers import FluxPipeline

    loras = _loras(_pipeline(tiny_models["flux"]).transformer)
    layers = _per_module_file(loras, lambda n: n, ("lora_A.weight", "lora_B.weight"), False)
    config = {
        "r": 2,
        "lora_alpha": 1.0,
        "target_modules": sorted(loras),
        "rank_pattern": {re.escape(n): down.shape[0] for n, (down, _, _) in loras.items()},
        "alpha_pattern": {re.escape(n): alpha for n, (_, _, alpha) in loras.items()},
    }
    FluxPipeline.save_lora_weights(
        tmp_path, weight_name="st.safetensors", transformer_lora_layers=layers, transformer_lora_adapter_metadata=config
    )
    _assert_loads_as(tiny_models["flux"], tmp_path / "st.safetensors", _deltas(loras))


def test_simpletuner_lycoris_file_with_lora_and_lokr(tiny_models, tmp_path):
    """SimpleTuner's LyCORIS names: lycoris_ + the diffusers path, LoRA and LoKr modules."""
    loras = _loras(_pipeline(tiny_models["flux"]).transformer)
    lokr_name = loras.pop("single_transformer_blocks.1.proj_out")
    tensors = _per_module_file(
        loras, lambda n: "lycoris_" + n.replace(".", "_"), ("lora_down.weight", "lora_up.weight")
    )
    deltas = _deltas(loras)
    out, inner = lokr_name[1].shape[0], lokr_name[0].shape[1]  # 32 x 160: kron of [4, 4] and [8, 40] factored
    w1, w2_a, w2_b = _random(4, 4, seed=7), _random(out // 4, 2, seed=8), _random(2, inner // 4, seed=9)
    stem = "lycoris_single_transformer_blocks_1_proj_out"
    tensors.update({f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2_a": w2_a, f"{stem}.lokr_w2_b": w2_b})
    tensors[f"{stem}.alpha"] = torch.tensor(3.0)
    deltas["single_transformer_blocks.1.proj_out"] = 3.0 / 2 * torch.kron(w1, w2_a @ w2_b)
    _assert_loads_as(tiny_models["flux"], write_lora_file(tmp_path / "lyco.safetensors", tensors), deltas)


def test_onetrainer_file_with_text_encoder(tiny_models, tmp_path):
    """OneTrainer: lora_transformer_ + the diffusers path, lora_te1_ for CLIP-L, alphas per module."""
    pipe = _pipeline(tiny_models["flux"])
    loras = _loras(pipe.transformer)
    tensors = _per_module_file(
        loras, lambda n: "lora_transformer_" + n.replace(".", "_"), ("lora_down.weight", "lora_up.weight")
    )
    te_down, te_up = _random(2, 32, seed=11), _random(32, 2, seed=12)
    stem = "lora_te1_" + TEXT.replace(".", "_")
    tensors.update(
        {f"{stem}.lora_down.weight": te_down, f"{stem}.lora_up.weight": te_up, f"{stem}.alpha": torch.tensor(1.0)}
    )
    path = write_lora_file(tmp_path / "ot.safetensors", tensors)
    _assert_loads_as(tiny_models["flux"], path, _deltas(loras), text_delta=0.5 * te_up @ te_down)


def _swap(tensor: torch.Tensor) -> torch.Tensor:
    half = tensor.shape[0] // 2
    return torch.cat([tensor[half:], tensor[:half]])


def _bfl_file(transformer, dense: bool) -> tuple[dict[str, tuple], dict[str, torch.Tensor]]:
    """kohya's layout: one LoRA per BFL module; fused ones block-diagonal (per-part LoRAs joined, as
    kohya's split_qkv writes them) or ``dense`` (trained on the fused module). Returns (BFL module ->
    (down, up, alpha), diffusers module -> update)."""
    loras, deltas = _loras(transformer), {}
    bfl: dict[str, list] = {}
    for name, (module, index) in BFL.items():
        bfl.setdefault(module, []).append((index, name))
    files = {}
    for seed, (module, parts) in enumerate(sorted(bfl.items())):
        names = [name for _, name in sorted(parts)]
        rows = [transformer.get_submodule(n).weight.shape[0] for n in names]
        inner = transformer.get_submodule(names[0]).weight.shape[1]
        if dense or len(names) == 1:  # one LoRA on the BFL module; each diffusers part gets its rows
            rank = 2 + seed % 3
            down, up, alpha = _random(rank, inner, seed=300 + seed), _random(sum(rows), rank, seed=400 + seed), 1.5
            full = alpha / rank * up @ down
            for name, piece in zip(names, torch.split(full, rows)):
                deltas[name] = _swap(piece) if module.startswith("final_layer") else piece
        else:  # down stacked, up block-diagonal with each part's scale folded in relative to the first
            scale = loras[names[0]][2] / loras[names[0]][0].shape[0]
            down = torch.cat([loras[n][0] for n in names])
            up = torch.block_diag(*[loras[n][1] * (loras[n][2] / loras[n][0].shape[0] / scale) for n in names])
            alpha = scale * down.shape[0]
            deltas.update(_deltas({n: loras[n] for n in names}))
        files[module] = (down, up, alpha)  # up's rows in BFL's order
    return files, deltas


@pytest.mark.parametrize("dense", [False, True], ids=["block-diagonal", "dense"])
def test_kohya_bfl_file(tiny_models, tmp_path, dense):
    files, deltas = _bfl_file(_pipeline(tiny_models["flux"]).transformer, dense)
    tensors = {}
    for module, (down, up, alpha) in files.items():
        stem = "lora_unet_" + module.replace(".", "_")
        tensors.update(
            {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}
        )
    te_down, te_up = _random(2, 32, seed=21), _random(32, 2, seed=22)
    stem = "lora_te1_" + TEXT.replace(".", "_")
    tensors.update({f"{stem}.lora_down.weight": te_down, f"{stem}.lora_up.weight": te_up})  # no alpha: scale 1
    path = write_lora_file(tmp_path / "kohya.safetensors", tensors)
    _assert_loads_as(tiny_models["flux"], path, deltas, text_delta=te_up @ te_down)


def test_comfyui_generic_bfl_layout(tiny_models, tmp_path):
    """diffusion_model. + BFL's path with PEFT part names, text_encoders.clip_l.transformer. for CLIP-L."""
    files, deltas = _bfl_file(_pipeline(tiny_models["flux"]).transformer, dense=True)
    tensors = {}
    for module, (down, up, alpha) in files.items():
        key = f"diffusion_model.{module}"
        tensors.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up, f"{key}.alpha": torch.tensor(alpha)})
    te_down, te_up = _random(2, 32, seed=31), _random(32, 2, seed=32)
    key = f"text_encoders.clip_l.transformer.{TEXT}"
    tensors.update({f"{key}.lora_A.weight": te_down, f"{key}.lora_B.weight": te_up})
    path = write_lora_file(tmp_path / "generic.safetensors", tensors)
    _assert_loads_as(tiny_models["flux"], path, deltas, text_delta=te_up @ te_down)


def test_convert_flux_both_ways(tiny_models, tmp_path):
    """A OneTrainer file -> kohya/BFL -> diffusers -> kohya: each loads as the source, the kohya files are
    equal, and diffusers' own loader reads the diffusers file the same way."""
    loras = _loras(_pipeline(tiny_models["flux"]).transformer)
    tensors = _per_module_file(
        loras, lambda n: "lora_transformer_" + n.replace(".", "_"), ("lora_down.weight", "lora_up.weight")
    )
    source = write_lora_file(tmp_path / "ot.safetensors", tensors)
    base = tiny_models["flux"]
    kohya, diffusers_file, back = (tmp_path / f"{n}.safetensors" for n in ("kohya", "diffusers", "back"))
    main(["convert", str(source), str(kohya), "--base", base, "--to", "kohya"])
    main(["convert", str(kohya), str(diffusers_file), "--base", base])
    main(["convert", str(diffusers_file), str(back), "--base", base])
    assert all(k.startswith("lora_unet_") for k in load_file(str(kohya)))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in load_file(str(kohya))
    original, again = load_file(str(kohya)), load_file(str(back))
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    for path in (kohya, diffusers_file):
        _assert_loads_as(base, path, _deltas(loras))
    # diffusers' kohya-Flux reader only knows the released sizes (see the full-size test below).
    theirs = _pipeline(base)
    theirs.load_lora_weights(str(diffusers_file))
    expected = flux_output(_truth(base, _deltas(loras)).transformer)
    torch.testing.assert_close(flux_output(theirs.transformer), expected, rtol=1e-4, atol=1e-5)


def test_diffusers_kohya_flux_converter_reads_lorafit_files_at_full_size(tmp_path):
    """diffusers' _convert_kohya_flux_lora_to_diffusers hard-codes FLUX.1's sizes (19 + 38 blocks, width
    3072): build the released transformer on the meta device, put a rank-1/2 LoRA on every Linear, write it
    with lorafit and compare each module's update on a random probe vector (no full weight matrix)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from lorafit.networks.files import save_kohya
    from lorafit.networks.lora_weights import LoraModuleWeights
    from lorafit.networks.model_fit import adaptable_layers

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)  # FLUX.1 [dev]'s config is the default
    assert transformer.config.num_layers == 19 and transformer.config.num_single_layers == 38
    generator = torch.Generator().manual_seed(0)
    modules = {}
    for index, (name, layer) in enumerate(sorted(adaptable_layers(transformer).items())):
        rank = 1 + index % 2
        # diffusers' converter ignores the final layer's alphas ("TODO: alphas"): give those scale 1.
        alpha = float(rank) if name in ("proj_out", "norm_out.linear") else 0.5 + index % 3
        down = torch.randn(rank, layer.in_features, generator=generator)
        modules[name] = LoraModuleWeights(down, torch.randn(layer.out_features, rank, generator=generator), alpha)
    path = save_kohya(tmp_path / "full.safetensors", "flux", {"transformer": modules}, transformer.config)
    theirs = _convert_kohya_flux_lora_to_diffusers(load_file(str(path)))
    theirs = {k.removeprefix("transformer."): v for k, v in theirs.items()}
    assert {k.rsplit(".lora_", 1)[0] for k in theirs} == set(modules)
    for name, lora in modules.items():
        probe = torch.randn(lora.down.shape[1], generator=generator)
        ours = lora.alpha / lora.rank * lora.up @ (lora.down @ probe)
        got = theirs[f"{name}.lora_B.weight"] @ (theirs[f"{name}.lora_A.weight"] @ probe)
        error = ((got - ours).abs().max() / ours.abs().max()).item()  # relative to the update's size
        assert error < 1e-4, f"{name}: diffusers' update differs by {error:.2e}"
