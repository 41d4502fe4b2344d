"""`lorafit inspect`: family, format, kinds, ranks/alphas per block, metadata, tags and hashes of a file."""

from __future__ import annotations

import hashlib
import json

import pytest
from toolbox_files import random_network

from lorafit.cli import main


def _kohya_sdxl(tiny_models, tmp_path, **kwargs):
    tags = {"10_ohwx star": {"ohwx": 16, "star": 16, "yellow": 5}, "1_world": {"circle": 40, "yellow": 7}}
    metadata = {
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_dim": "4",
        "ss_tag_frequency": json.dumps(tags),
        "ss_training_comment": "trained with lorafit 0.1",
        "ss_learning_rate": "0.0001",
    }
    return random_network(tiny_models["sdxl"], tmp_path / "x.safetensors", metadata=metadata, **kwargs)


def test_inspect_shows_what_the_file_is(tiny_models, tmp_path, capsys):
    path = _kohya_sdxl(tiny_models, tmp_path)
    main(["inspect", str(path)])
    out = capsys.readouterr().out
    assert "family    Stable Diffusion XL" in out and "guessed" not in out
    assert "format    kohya" in out and "LoRA;" in out
    assert "te1 " in out and "te2 " in out and "unet " in out  # module count per component
    # Ranks/alphas per SGM block: SDXL's attention sits in IN04/IN05/IN07/IN08, M00, OUT00-OUT05.
    block_lines = [line.split() for line in out.splitlines() if line.startswith(("  IN", "  OUT", "  M00", "  TE"))]
    assert {line[0] for line in block_lines} >= {"TE1", "TE2", "M00"}
    assert all(line[3] == "4" and line[4] == "2-4" for line in block_lines)  # rank 4; two alphas (2 and 4)
    assert "ss_learning_rate = 0.0001" in out and "trained with lorafit" in out
    assert "ohwx (16), star (16), circle (40)" not in out  # most frequent first:
    assert "circle (40), ohwx (16), star (16), yellow (12)" in out
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() in out
    header = int.from_bytes(data[:8], "little")
    assert hashlib.sha256(data[8 + header :]).hexdigest() in out  # A1111's LoRA hash: the tensor data


def test_inspect_json_lists_every_module_for_scripts(tiny_models, tmp_path, capsys):
    path = random_network(tiny_models["sd1"], tmp_path / "x.safetensors", "diffusers", kind="dora", conv=True)
    main(["inspect", str(path), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "diffusers" and info["family"] == "sd1" and info["family_guessed"] is True
    assert info["kinds"] == ["dora"]
    assert info["components"] == {"text_encoder": 9, "unet": len(info["modules"]) - 9}
    conv = [m for m in info["modules"] if len(m["shape"]) == 4 and m["shape"][2:] == [3, 3]]
    assert conv and all(m["rank"] == 4 for m in conv)
    assert json.loads(info["metadata"]["lora_adapter_metadata"])["unet.use_dora"] is True


@pytest.mark.parametrize("kind, shown", [("lora", "LoRA, LoCon"), ("loha", "LoHa"), ("lokr", "LoKr")])
def test_inspect_names_each_network_kind(tiny_models, tmp_path, capsys, kind, shown):
    path = random_network(
        tiny_models["sd1"], tmp_path / "x.safetensors", kind=kind, conv=kind == "lora", text_encoder=False
    )
    main(["inspect", str(path), "--base", tiny_models["sd1"]])  # with the base: LoHa shapes, the family for sure
    out = capsys.readouterr().out
    assert f"network   {shown};" in out and "guessed" not in out


def test_inspect_of_a_flux_file_shows_double_and_single_blocks(tiny_models, tmp_path, capsys):
    path = random_network(tiny_models["flux"], tmp_path / "x.safetensors")
    main(["inspect", str(path), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "flux" and info["family_guessed"] is False
    blocks = {b["block"]: b for b in info["blocks"]}
    assert {"TE1", "D00", "D01", "S00", "S01"} <= set(blocks)
    assert blocks["S00"]["rank"] == "16"  # linear1: q, k, v and proj_mlp joined (rank 4 each, one of them zero)


def test_a_file_that_is_not_a_network_is_one_line(tmp_path, capsys):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit):
        main(["inspect", str(bad)])
    err = capsys.readouterr().err.strip()
    assert "is not a readable .safetensors file" in err and "\n" not in err


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_inspect_reads_every_family_in_both_formats(tiny_models, tmp_path, capsys, family, fmt):
    from lorafit.networks.toolbox.network_file import read_network

    path = random_network(tiny_models[family], tmp_path / "x.safetensors", fmt)
    main(["inspect", str(path), "--json", "--base", tiny_models[family]])
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["format"], info["family_guessed"]) == (family, fmt, False)
    assert info["kinds"] == ["lora"] and len(info["modules"]) == len(read_network(path).modules)
    blocks = {b["block"] for b in info["blocks"]}
    ranks = {m["rank"] for m in info["modules"]}  # rank 4; Flux kohya fused modules: 4 per part (qkv 12, linear1 16)
    assert ranks == ({4, 12, 16} if (family, fmt) == ("flux", "kohya") else {4})
    assert blocks >= ({"TE"} if family == "sd1" else {"TE1"}) and blocks >= (
        {"D00", "S00"} if family == "flux" else {"M00"}
    )
    data = path.read_bytes()
    assert info["tensor_sha256"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()


def test_inspect_summarises_a_diffusers_files_peft_config(tiny_models, tmp_path, capsys):
    path = random_network(tiny_models["sd1"], tmp_path / "x.safetensors", "diffusers", kind="dora", text_encoder=False)
    main(["inspect", str(path)])
    line = next(line for line in capsys.readouterr().out.splitlines() if "(lora_adapter_metadata:" in line)
    assert "unet: r 4" in line and "DoRA" in line


def test_a_comfyui_diffusion_model_file_is_refused_with_the_conversion_to_run(tiny_models, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    path = random_network(tiny_models["sdxl"], tmp_path / "x.safetensors", text_encoder=False)
    comfy = tmp_path / "comfy.safetensors"
    save_file({f"diffusion_model.{k.removeprefix('lora_unet_')}": v for k, v in load_file(str(path)).items()}, comfy)
    with pytest.raises(SystemExit):
        main(["resize", str(comfy), "--rank", "2"])
    err = capsys.readouterr().err.strip()
    assert "diffusion_model.*" in err and "lorafit convert" in err and "\n" not in err
