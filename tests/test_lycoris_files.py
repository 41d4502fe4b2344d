"""Files written by other tools (LyCORIS conventions) load as A1111/ComfyUI read them; odd ones fail in one line."""

from __future__ import annotations

import pytest
import torch
from app_reference import apply_kohya_file
from network_reference import pipeline
from safetensors.torch import save_file
from training import unet_output

import lorafit
from lorafit.errors import LorafitError
from lorafit.networks.kohya_format import kohya_stem

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
FF_OUT = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
CONV1 = "down_blocks.0.resnets.0.conv1"
CONV2 = "down_blocks.0.resnets.0.conv2"


def _random(*shape, seed=[0]) -> torch.Tensor:  # noqa: B006 -- a counter shared by every call on purpose
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0])) * 0.3


def _stem(pipe, module: str) -> str:
    return kohya_stem("sd1", "unet", module, pipe.unet.config)


def _mixed_file(pipe, path):
    """One file, four kinds, LyCORIS's choices: factored and full LoKr factors, a LoHa without alpha, DoRA."""
    unet = dict(pipe.unet.named_modules())
    out, inp = unet[TO_Q].weight.shape  # 32 x 32
    tensors = {
        # LoKr, factor 4: w1 [4, 4] factored rank 2, w2 [8, 8] factored rank 2; scale alpha / 2.
        f"{_stem(pipe, TO_Q)}.lokr_w1_a": _random(4, 2),
        f"{_stem(pipe, TO_Q)}.lokr_w1_b": _random(2, 4),
        f"{_stem(pipe, TO_Q)}.lokr_w2_a": _random(out // 4, 2),
        f"{_stem(pipe, TO_Q)}.lokr_w2_b": _random(2, inp // 4),
        f"{_stem(pipe, TO_Q)}.alpha": torch.tensor(3.0),
        # LoKr on a 3x3 conv with both factors full: the apps ignore alpha (scale 1).
        f"{_stem(pipe, CONV1)}.lokr_w1": _random(2, 4),
        f"{_stem(pipe, CONV1)}.lokr_w2": _random(16, 8, 3, 3),
        f"{_stem(pipe, CONV1)}.alpha": torch.tensor(7.0),
        # LoKr on a conv, w1 full and w2 factored with w2_b flat over the kernel.
        f"{_stem(pipe, CONV2)}.lokr_w1": _random(4, 2),
        f"{_stem(pipe, CONV2)}.lokr_w2_a": _random(8, 3),
        f"{_stem(pipe, CONV2)}.lokr_w2_b": _random(3, 16 * 9),
        f"{_stem(pipe, CONV2)}.alpha": torch.tensor(1.5),
        # LoHa without alpha: scale 1.
        f"{_stem(pipe, FF_OUT)}.hada_w1_a": _random(32, 3),
        f"{_stem(pipe, FF_OUT)}.hada_w1_b": _random(3, 128),
        f"{_stem(pipe, FF_OUT)}.hada_w2_a": _random(32, 3),
        f"{_stem(pipe, FF_OUT)}.hada_w2_b": _random(3, 128),
        # DoRA (LyCORIS wd_on_out): magnitude per output channel, [out, 1].
        f"{_stem(pipe, TO_K)}.lora_down.weight": _random(2, inp),
        f"{_stem(pipe, TO_K)}.lora_up.weight": _random(out, 2),
        f"{_stem(pipe, TO_K)}.alpha": torch.tensor(1.0),
        f"{_stem(pipe, TO_K)}.dora_scale": unet[TO_K].weight.norm(dim=1, keepdim=True) * (1 + _random(out, 1)),
    }
    save_file({k: v.half() for k, v in tensors.items()}, str(path))  # other trainers save fp16
    return path


def test_a_file_of_every_lycoris_kind_loads_as_the_apps_read_it(tiny_models, tmp_path):
    pipe = pipeline(tiny_models["sd1"])
    base = unet_output(pipe.unet)
    path = _mixed_file(pipe, tmp_path / "lycoris.safetensors")
    lorafit.load_lora(pipe, path, weight=0.6)
    truth = apply_kohya_file(pipeline(tiny_models["sd1"]), "sd1", path, strength=0.6)
    assert (unet_output(truth.unet) - base).abs().max() > 1e-2
    assert (unet_output(pipe.unet) - unet_output(truth.unet)).abs().max() < 1e-4
    lorafit.unload_lora(pipe)
    assert torch.equal(unet_output(pipe.unet), base)


def test_networks_of_two_kinds_on_the_same_modules_add_up(tiny_models, tmp_path):
    pipe = pipeline(tiny_models["sd1"])
    stem = _stem(pipe, TO_Q)
    loha = tmp_path / "loha.safetensors"
    save_file(
        {
            f"{stem}.hada_w1_a": _random(32, 2),
            f"{stem}.hada_w1_b": _random(2, 32),
            f"{stem}.hada_w2_a": _random(32, 2),
            f"{stem}.hada_w2_b": _random(2, 32),
            f"{stem}.alpha": torch.tensor(2.0),
        },
        str(loha),
    )
    lora = tmp_path / "lora.safetensors"
    save_file(
        {
            f"{stem}.lora_down.weight": _random(4, 32),
            f"{stem}.lora_up.weight": _random(32, 4),
            f"{stem}.alpha": torch.tensor(1.0),
        },
        str(lora),
    )
    lorafit.load_lora(pipe, loha)
    lorafit.load_lora(pipe, lora, weight=0.5)
    truth = apply_kohya_file(apply_kohya_file(pipeline(tiny_models["sd1"]), "sd1", loha), "sd1", lora, strength=0.5)
    assert (unet_output(pipe.unet) - unet_output(truth.unet)).abs().max() < 1e-4
    lorafit.unload_lora(pipe, "loha")
    alone = apply_kohya_file(pipeline(tiny_models["sd1"]), "sd1", lora, strength=0.5)
    assert (unet_output(pipe.unet) - unet_output(alone.unet)).abs().max() < 1e-4


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"hada_t1": (2, 2, 3, 3)}, r"unsupported \['hada_t1'\]"),
        ({"lokr_t2": (2, 2, 3, 3)}, r"unsupported \['lokr_t2'\]"),
        ({"lora_mid.weight": (2, 2, 3, 3)}, r"unsupported \['lora_mid.weight'\]"),
        ({"dora_scale": (2, 32)}, "neither per output channel"),
        ({"weird": (1,)}, r"unsupported \['weird'\]"),
    ],
)
def test_parts_lorafit_cannot_read_are_one_line_errors(tiny_models, tmp_path, extra, message):
    pipe = pipeline(tiny_models["sd1"])
    stem = _stem(pipe, TO_Q)
    name = next(iter(extra))
    if name.startswith("hada"):
        parts = {"hada_w1_a": (32, 2), "hada_w1_b": (2, 32), "hada_w2_a": (32, 2), "hada_w2_b": (2, 32)}
    elif name.startswith("lokr"):
        parts = {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}
    else:
        parts = {"lora_down.weight": (2, 32), "lora_up.weight": (32, 2)}
    parts.update(extra)
    path = tmp_path / "odd.safetensors"
    save_file({f"{stem}.{part}": torch.zeros(shape) for part, shape in parts.items()}, str(path))
    with pytest.raises(LorafitError, match=message) as error:
        lorafit.load_lora(pipe, path)
    assert "\n" not in str(error.value) and stem in str(error.value)
    assert not any(".base_layer" in n for n, _ in pipe.unet.named_modules()), "a failed load left adapters behind"


@pytest.mark.parametrize(
    "parts",
    [
        {"lora_down.weight": (2, 31), "lora_up.weight": (32, 2)},
        {"lokr_w1": (2, 4), "lokr_w2": (8, 8)},  # kron is 16 x 32, the module is 32 x 32
        {"lokr_w1": (8, 2), "lokr_w2": (8, 8)},  # 64 x 16: as many elements, wrong rows
        {"hada_w1_a": (32, 2), "hada_w1_b": (2, 16), "hada_w2_a": (32, 2), "hada_w2_b": (2, 16)},
    ],
    ids=["lora", "lokr-size", "lokr-rows", "loha"],
)
def test_a_file_for_another_module_shape_is_a_one_line_error_and_loads_nothing(tiny_models, tmp_path, parts):
    pipe = pipeline(tiny_models["sd1"])
    base = unet_output(pipe.unet)
    good, bad = _stem(pipe, TO_K), _stem(pipe, TO_Q)
    tensors = {f"{good}.lora_down.weight": _random(2, 32), f"{good}.lora_up.weight": _random(32, 2)}
    tensors.update({f"{bad}.{part}": _random(*shape) for part, shape in parts.items()})
    path = tmp_path / "wrong.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LorafitError, match="does not fit") as error:
        lorafit.load_lora(pipe, path)
    assert "\n" not in str(error.value) and TO_Q in str(error.value)
    assert lorafit.loaded_loras(pipe) == {} and torch.equal(unet_output(pipe.unet), base)
    assert not any(".base_layer" in n for n, _ in pipe.unet.named_modules())
