"""Network options through `lorafit fit`: YAML/CLI values reach the exported file, and resume works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from network_reference import pipeline
from safetensors import safe_open
from safetensors.torch import load_file
from training import unet_output

import lorafit
from lorafit.cli import main

REPO = Path(__file__).resolve().parents[1]


def _fit(tmp_path, tiny_models, demo_data, *args: str):
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "tiny-demo.yaml"),
            "--model.model",
            tiny_models["sdxl"],
            "--data.train_dir",
            demo_data,
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--trainer.max_epochs",
            "1",
            "--trainer.logger",
            "false",
            *args,
        ]
    )


@pytest.mark.slow
def test_network_options_from_a_config_file_reach_the_exported_file(tmp_path, tiny_models, demo_data):
    overlay = tmp_path / "loha.yaml"
    overlay.write_text(
        "model:\n"
        "  network_type: loha\n"
        "  target_preset: attn-mlp\n"
        "  exclude: ['attn2\\.to_k']\n"
        "  rank_pattern: {'up_blocks\\.0\\..*': 6}\n"
        "  train_text_encoder: false\n"
    )
    _fit(tmp_path, tiny_models, demo_data, "--config", str(overlay))
    path = tmp_path / "run" / "lora" / "ohwx-star.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        ranks = {k: handle.get_tensor(k).shape[0] for k in keys if k.endswith("hada_w1_b")}
        metadata = handle.metadata()
    assert {k.partition(".")[2] for k in keys} == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    assert any("_ff_net_2." in k for k in keys) and not any("attn2_to_k" in k for k in keys)
    assert {r for k, r in ranks.items() if k.startswith("lora_unet_output_blocks_")} >= {6}
    assert json.loads(metadata["ss_network_args"])["algo"] == "loha"
    assert not (tmp_path / "run" / "lora" / "diffusers").exists()
    pipe = pipeline(tiny_models["sdxl"])
    base = unet_output(pipe.unet)
    lorafit.load_lora(pipe, path)
    assert not torch.equal(unet_output(pipe.unet), base)


@pytest.mark.slow
def test_a_lokr_run_resumes_from_its_checkpoint(tmp_path, tiny_models, demo_data):
    _fit(tmp_path, tiny_models, demo_data, "--model.network_type", "lokr")
    lora = tmp_path / "run" / "lora"
    first = load_file(str(lora / "ohwx-star-epoch-001.safetensors"))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"] and all(".lokr_" in k for k in checkpoint["state_dict"])  # adapter only
    _fit(
        tmp_path,
        tiny_models,
        demo_data,
        "--model.network_type",
        "lokr",
        "--trainer.max_epochs",
        "2",
        "--ckpt_path",
        str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
    )
    second = load_file(str(lora / "ohwx-star-epoch-002.safetensors"))
    assert second.keys() == first.keys() and any(k.endswith(".lokr_w1") for k in second)
    assert any(not torch.equal(first[k], second[k]) for k in first), "the resumed epoch trained nothing"


def test_unknown_network_type_is_one_line(tmp_path, tiny_models, demo_data, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _fit(tmp_path, tiny_models, demo_data, "--model.network.type", "lycoris")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "network.type" in err[0], err
