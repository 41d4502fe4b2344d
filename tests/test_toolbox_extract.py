"""`lorafit extract`: a LoRA merged into a base comes back by extraction; single files; LoCon; reports."""

from __future__ import annotations

import csv

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from toolbox_files import assert_loads_like, pipeline, random_network, relative_error, updates

from lorafit.cli import main
from lorafit.families.flux_layout import bfl_state_dict
from lorafit.families.original_checkpoint import original_state_dict
from lorafit.networks.toolbox.network_file import read_network

FAMILIES = ("sd1", "sd2", "sdxl", "flux")


def _tuned(model_dir, lora, out):
    main(["merge", str(lora), "--into", model_dir, "--out", str(out)])
    return str(out)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("family", FAMILIES)
def test_extracting_a_merged_lora_gives_it_back(tiny_models, tmp_path, family, fmt):
    model = tiny_models[family]
    lora = random_network(model, tmp_path / "a.safetensors", rank=4)
    tuned = _tuned(model, lora, tmp_path / "tuned")
    out = tmp_path / "extracted.safetensors"
    rank = "12" if family == "flux" and fmt == "kohya" else "4"  # Flux kohya: fused q/k/v of rank 4 each
    main(
        [
            "extract",
            "--base",
            model,
            "--tuned",
            tuned,
            "--rank",
            rank,
            "--preset",
            "attn",
            "--out",
            str(out),
            "--format",
            fmt,
        ]
    )
    want, got = updates(lora, model), updates(out, model)
    assert read_network(out).format == fmt
    # Every module of the LoRA, and no module it left alone (a fused Flux module's untouched part,
    # proj_mlp of linear1, comes back as rounding noise only).
    largest = max(float(v.norm()) for v in want.values())
    changed = {k for k, v in got.items() if float(v.norm()) > 1e-5 * largest}
    assert changed == {k for k, v in want.items() if float(v.norm()) > 0}
    assert max(relative_error(got[k], want[k]) for k in changed) < 1e-4
    assert {m.alpha / m.rank for m in read_network(out).modules.values()} == {1.0}  # alpha = rank, as kohya


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_an_extracted_file_loads_in_lorafit_diffusers_and_the_apps(tiny_models, tmp_path, family):
    model = tiny_models[family]
    tuned = _tuned(model, random_network(model, tmp_path / "a.safetensors", text_encoder=False), tmp_path / "tuned")
    for fmt in ("kohya", "diffusers"):
        out = tmp_path / f"{fmt}.safetensors"
        main(["extract", "--base", model, "--tuned", tuned, "--rank", "16", "--out", str(out), "--format", fmt])
        assert_loads_like(out, model)


def _single_file(model_dir, path):
    pipe = pipeline(model_dir)
    if getattr(pipe, "transformer", None) is not None:
        state = bfl_state_dict(pipe.transformer)
    else:
        state = original_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_extract_reads_single_files_and_reports_each_modules_error(tiny_models, tmp_path, family, capsys):
    model = tiny_models[family]
    lora = random_network(model, tmp_path / "a.safetensors", rank=4, text_encoder=family != "flux")
    base = _single_file(model, tmp_path / "base.safetensors")
    tuned = tmp_path / "tuned.safetensors"
    main(["merge", str(lora), "--into", base, "--out", str(tuned), "--single_file_config", model])
    out, report = tmp_path / "x.safetensors", tmp_path / "report.csv"
    args = ["extract", "--base", base, "--tuned", str(tuned), "--single_file_config", model, "--preset", "attn"]
    main([*args, "--rank", "2", "--out", str(out), "--report", str(report)])
    rows = list(csv.DictReader(report.open()))
    assert rows and all(0 < float(r["relative_error"]) < 1 and r["rank_after"] == "2" for r in rows)
    printed = capsys.readouterr().out
    assert "relative error" in printed and "Frobenius norm kept" in printed
    # From a directory base and a single-file tune alike: at the full rank the LoRA comes back.
    main([*args[:2], model, *args[3:], "--rank", "12", "--out", str(tmp_path / "full.safetensors")])
    want, got = updates(lora, model), updates(tmp_path / "full.safetensors", model)
    assert max(relative_error(got[k], want[k]) for k in want) < 1e-4


def test_an_unchanged_text_encoder_is_left_out_and_locon_takes_conv_rank(tiny_models, tmp_path, caplog):
    model = tiny_models["sd1"]
    lora = random_network(model, tmp_path / "a.safetensors", conv=True, text_encoder=False)
    tuned = _tuned(model, lora, tmp_path / "tuned")
    out = tmp_path / "x.safetensors"
    main(["extract", "--base", model, "--tuned", tuned, "--rank", "4", "--conv_rank", "4", "--out", str(out)])
    modules = read_network(out).modules
    assert not any(name.startswith("lora_te") for name in modules)
    assert any(m.down.dim() == 4 and m.down.shape[-1] == 3 for m in modules.values())  # 3x3 LoCon modules
    want, got = updates(lora, model), updates(out, model)
    assert max(relative_error(got[k], want[k]) for k in want) < 1e-4
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_args"] == '{"conv_dim": "4", "conv_alpha": "4.0"}'
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_models_of_two_families_are_refused_in_one_line(tiny_models, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "extract",
                "--base",
                tiny_models["sd1"],
                "--tuned",
                tiny_models["sdxl"],
                "--rank",
                "4",
                "--out",
                str(tmp_path / "x.safetensors"),
            ]
        )
    err = capsys.readouterr().err.strip()
    assert "extract needs one family" in err and "\n" not in err


def test_identical_models_give_no_lora(tiny_models, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "extract",
                "--base",
                tiny_models["sd1"],
                "--tuned",
                tiny_models["sd1"],
                "--rank",
                "4",
                "--out",
                str(tmp_path / "x.safetensors"),
            ]
        )
    assert "does not differ" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
