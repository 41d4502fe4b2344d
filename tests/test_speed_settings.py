"""Speed settings change how the step runs, never what it learns or what the files hold."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from training import train, unet_output


def test_channels_last_trains_the_same_locon_and_exports_loadable_files(tiny_models, demo_data, tmp_path):
    common = dict(max_steps=3, batch_size=2, network_type="locon", conv_rank=4)
    _, plain = train(tiny_models["sd1"], demo_data, tmp_path / "plain", **common)
    _, fast = train(tiny_models["sd1"], demo_data, tmp_path / "channels-last", channels_last=True, **common)

    conv = fast.unet.down_blocks[0].resnets[0].conv1
    assert conv.base_layer.weight.is_contiguous(memory_format=torch.channels_last)
    assert any(
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for name, p in fast.unet.named_parameters()
        if "lora_" in name
    ), "the conv LoRA weights too"

    expected = load_file(str(tmp_path / "plain" / "lora" / "test.safetensors"))
    written = load_file(str(tmp_path / "channels-last" / "lora" / "test.safetensors"))
    assert written.keys() == expected.keys() and any(".conv1." in k or "conv1" in k for k in written)
    for key, tensor in written.items():
        assert tensor.is_contiguous(), key
        # Same maths in another memory layout: only the convolutions' summation order differs, which
        # Adam turns into differences of ~1e-5 in near-zero weights (3 steps at 1e-3 move up to 3e-3).
        torch.testing.assert_close(tensor, expected[key], rtol=1e-3, atol=1e-4, msg=key)
    torch.testing.assert_close(unet_output(fast.unet), unet_output(plain.unet), rtol=1e-4, atol=1e-5)
    assert any(written[k].abs().max() > 1e-3 for k in written if "lora_up" in k), "the run trained something"
