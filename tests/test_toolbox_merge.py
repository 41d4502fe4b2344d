"""`lorafit merge`: LoRAs into one LoRA (exact concat, SVD to a rank), LoRAs into the base (all layouts)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from toolbox_files import (
    assert_loads_like,
    denoiser_output,
    merged_components,
    pipeline,
    pipeline_components,
    random_network,
    relative_error,
    updates,
)

from lorafit.cli import main
from lorafit.families.flux_layout import bfl_state_dict
from lorafit.families.original_checkpoint import original_state_dict
from lorafit.networks.toolbox.network_file import read_network

FAMILIES = ("sd1", "sd2", "sdxl", "flux")
# Every family with kohya files; SD1.5, SDXL and Flux with diffusers files too.
FAMILY_FORMATS = [(f, "kohya") for f in FAMILIES] + [(f, "diffusers") for f in ("sd1", "sdxl", "flux")]


def _two_loras(model_dir, tmp_path, fmt="kohya", **kwargs):
    tags = {"ss_tag_frequency": json.dumps({"10_ohwx": {"ohwx": 10, "star": 4}})}
    a = random_network(model_dir, tmp_path / "a.safetensors", fmt, seed=1, metadata=tags, **kwargs)
    b = random_network(model_dir, tmp_path / "b.safetensors", fmt, seed=2, rank=2, **kwargs)
    return a, b


def _error(out, files, model_dir) -> float:
    """Largest relative difference between ``out``'s updates and the weighted sum of ``files``'."""
    got = updates(out, model_dir)
    want: dict = {}
    for path, strength in files:
        for key, update in updates(path, model_dir).items():
            want[key] = want.get(key, 0) + strength * update
    assert got.keys() == want.keys()
    return max(relative_error(got[k], want[k]) for k in want)


@pytest.mark.parametrize("family, fmt", FAMILY_FORMATS)
def test_concatenation_is_exactly_the_weighted_sum_of_the_loras(tiny_models, tmp_path, family, fmt, capsys):
    a, b = _two_loras(tiny_models[family], tmp_path, fmt)
    out = tmp_path / "ab.safetensors"
    main(["merge", f"{a}:0.7", f"{b}:-0.5", "--out", str(out)])
    assert _error(out, [(a, 0.7), (b, -0.5)], tiny_models[family]) < 1e-5
    merged, first = read_network(out), read_network(a)
    assert set(merged.modules) == set(first.modules)  # same names: loads wherever the inputs did
    assert "concatenated" in capsys.readouterr().out
    if fmt == "kohya":
        with safe_open(str(out), framework="pt") as handle:
            meta = handle.metadata()
        assert meta["modelspec.merged_from"] == "a:0.7, b:-0.5"
        assert json.loads(meta["ss_tag_frequency"]) == {"a/10_ohwx": {"ohwx": 10, "star": 4}}
    assert_loads_like(out, tiny_models[family], diffusers_too=False)


@pytest.mark.parametrize(
    "family, fmt", [("sd1", "kohya"), ("sdxl", "diffusers"), ("flux", "kohya"), ("flux", "diffusers")]
)
def test_svd_merge_at_the_summed_rank_is_exact_and_a_lower_rank_reports_its_cut(
    tiny_models, tmp_path, family, fmt, capsys
):
    a, b = _two_loras(tiny_models[family], tmp_path, fmt)
    full, cut, report = tmp_path / "full.safetensors", tmp_path / "cut.safetensors", tmp_path / "r.json"
    main(["merge", str(a), f"{b}:0.5", "--rank", "64", "--out", str(full)])
    assert _error(full, [(a, 1.0), (b, 0.5)], tiny_models[family]) < 1e-4
    main(["merge", str(a), f"{b}:0.5", "--rank", "2", "--out", str(cut), "--report", str(report)])
    assert {m.rank for m in read_network(cut).modules.values()} == {2}
    rows = json.loads(report.read_text())
    assert all(0 < r["fro_kept"] < 1 and r["rank_after"] == 2 for r in rows)
    assert 0.05 < _error(cut, [(a, 1.0), (b, 0.5)], tiny_models[family]) < 1
    assert "Frobenius norm kept" in capsys.readouterr().out


def test_files_of_two_formats_merge_given_the_base(tiny_models, tmp_path, capsys):
    model = tiny_models["flux"]
    a = random_network(model, tmp_path / "a.safetensors", "kohya", seed=1)
    b = random_network(model, tmp_path / "b.safetensors", "diffusers", seed=2)
    out = tmp_path / "ab.safetensors"
    with pytest.raises(SystemExit):
        main(["merge", str(a), str(b), "--out", str(out)])
    assert "pass --base" in capsys.readouterr().err
    main(["merge", str(a), str(b), "--out", str(out), "--base", model, "--format", "diffusers"])
    assert read_network(out).format == "diffusers"
    assert _error(out, [(a, 1.0), (b, 1.0)], model) < 1e-5
    assert_loads_like(out, model)


def test_dora_in_a_lora_merge_is_refused_in_one_line(tiny_models, tmp_path, capsys):
    a = random_network(tiny_models["sd1"], tmp_path / "a.safetensors", kind="dora", text_encoder=False)
    with pytest.raises(SystemExit):
        main(["merge", str(a), str(a), "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.strip()
    assert "DoRA" in err and "--into" in err and "\n" not in err


def _truth_state(model_dir, files, family):
    components = merged_components(model_dir, files)
    if family == "flux":
        return bfl_state_dict(components["transformer"])
    pipe = pipeline(model_dir)
    return original_state_dict(
        components["unet"], pipe.vae, components["text_encoder"], components.get("text_encoder_2")
    )


def _assert_same(state: dict, truth: dict, atol: float = 1e-6) -> None:
    assert state.keys() == truth.keys()
    worst = max((state[k].float() - truth[k].float()).abs().max().item() for k in truth)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def single_files(tiny_models, tmp_path_factory) -> dict[str, str]:
    """Each tiny model as the single file A1111/ComfyUI load (Flux: BFL's transformer file)."""
    root = tmp_path_factory.mktemp("single")
    files = {}
    for family in FAMILIES:
        pipe = pipeline(tiny_models[family])
        if family == "flux":
            state = bfl_state_dict(pipe.transformer)
        else:
            state = original_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
        files[family] = str(root / f"{family}.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, files[family])
    return files


@pytest.mark.parametrize("family, fmt", FAMILY_FORMATS)
def test_merge_into_a_single_file_writes_the_merged_weights_under_its_names(
    tiny_models, single_files, tmp_path, family, fmt
):
    a, b = _two_loras(tiny_models[family], tmp_path, fmt, text_encoder=family != "flux")
    out = tmp_path / "merged.safetensors"
    config = ["--single_file_config", tiny_models[family]]
    main(["merge", f"{a}:0.8", f"{b}:-0.3", "--into", single_files[family], "--out", str(out), *config])
    _assert_same(load_file(str(out)), _truth_state(tiny_models[family], [(a, 0.8), (b, -0.3)], family))
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["modelspec.merged_from"] == f"{family}.safetensors, a:0.8, b:-0.3"
    if family != "flux":  # and diffusers reads it back as the merged model
        from diffusers import DiffusionPipeline

        cls = type(pipeline(tiny_models[family]))
        loaded = cls.from_single_file(str(out), config=tiny_models[family])
        truth = merged_components(tiny_models[family], [(a, 0.8), (b, -0.3)])
        torch.testing.assert_close(denoiser_output(pipeline_components(loaded)), denoiser_output(truth))
        assert isinstance(loaded, DiffusionPipeline)


@pytest.mark.parametrize("family, fmt", FAMILY_FORMATS)
def test_merge_into_a_directory_writes_a_pipeline_diffusers_loads(tiny_models, tmp_path, family, fmt):
    kind = "dora" if family == "sdxl" else "lora"
    a = random_network(tiny_models[family], tmp_path / "a.safetensors", fmt, kind=kind)
    out = tmp_path / "merged"
    main(["merge", f"{a}:0.6", "--into", tiny_models[family], "--out", str(out)])
    loaded, truth = pipeline(str(out)), merged_components(tiny_models[family], [(a, 0.6)])
    for name, module in truth.items():
        got = getattr(loaded, name).state_dict()
        assert max((got[k] - v).abs().max().item() for k, v in module.state_dict().items()) < 1e-6, name


def test_merging_at_weight_zero_gives_the_base_bit_for_bit(tiny_models, single_files, tmp_path):
    a = random_network(tiny_models["sdxl"], tmp_path / "a.safetensors", kind="dora")
    out = tmp_path / "zero.safetensors"
    main(
        [
            "merge",
            f"{a}:0",
            "--into",
            single_files["sdxl"],
            "--out",
            str(out),
            "--single_file_config",
            tiny_models["sdxl"],
        ]
    )
    base, merged = load_file(single_files["sdxl"]), load_file(str(out))
    assert base.keys() == merged.keys() and all(torch.equal(base[k], merged[k]) for k in base)
    directory = tmp_path / "zero-dir"
    main(["merge", f"{a}:0", "--into", tiny_models["sdxl"], "--out", str(directory)])
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        base, merged = load_file(f"{tiny_models['sdxl']}/{part}"), load_file(str(directory / part))
        assert all(torch.equal(base[k], merged[k]) for k in base)


def test_merge_changes_layout_both_ways_in_a_chosen_dtype(tiny_models, single_files, tmp_path):
    model, family = tiny_models["sdxl"], "sdxl"
    a = random_network(model, tmp_path / "a.safetensors")
    to_file, to_dir = tmp_path / "from-dir.safetensors", tmp_path / "from-file"
    main(["merge", str(a), "--into", model, "--out", str(to_file), "--save_dtype", "float16"])
    main(["merge", str(a), "--into", single_files[family], "--out", str(to_dir), "--single_file_config", model])
    truth = _truth_state(model, [(a, 1.0)], family)
    state = load_file(str(to_file))
    assert {t.dtype for t in state.values()} == {torch.float16}
    _assert_same(state, {k: v.half() for k, v in truth.items()}, atol=0)
    loaded = pipeline(str(to_dir))
    want = merged_components(model, [(a, 1.0)])
    torch.testing.assert_close(denoiser_output(pipeline_components(loaded)), denoiser_output(want))


def test_flux_text_encoder_modules_need_a_directory_or_to_be_left_out(tiny_models, single_files, tmp_path, capsys):
    a = random_network(tiny_models["flux"], tmp_path / "a.safetensors")
    out = tmp_path / "m.safetensors"
    args = [
        "merge",
        str(a),
        "--into",
        single_files["flux"],
        "--out",
        str(out),
        "--single_file_config",
        tiny_models["flux"],
    ]
    with pytest.raises(SystemExit):
        main(args)
    assert "--text_encoders false" in capsys.readouterr().err and not out.exists()
    main([*args, "--text_encoders", "false"])
    assert out.exists()


def test_merge_never_overwrites_a_model(tiny_models, tmp_path, capsys):
    a = random_network(tiny_models["sd1"], tmp_path / "a.safetensors")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    with pytest.raises(SystemExit):
        main(["merge", str(a), "--into", tiny_models["sd1"], "--out", str(tmp_path / "taken")])
    assert "already exists" in capsys.readouterr().err and (tmp_path / "taken" / "x").read_text() == "mine"


def test_a_directory_merge_writes_only_what_the_pipeline_reads(tiny_models, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_models["sd1"], base)
    # What hub snapshots also hold: a single-file copy at the root, weights of other frameworks.
    shutil.copy(base / "unet" / "diffusion_pytorch_model.safetensors", base / "v1-5-pruned.safetensors")
    (base / "text_encoder" / "flax_model.msgpack").write_bytes(b"flax")
    a = random_network(str(base), tmp_path / "a.safetensors")
    out = tmp_path / "merged"
    main(["merge", str(a), "--into", str(base), "--out", str(out)])
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert "v1-5-pruned.safetensors" not in written and "text_encoder/flax_model.msgpack" not in written
    assert {"model_index.json", "unet/config.json", "tokenizer/tokenizer.json"} <= written
    assert "scheduler/scheduler_config.json" in written
