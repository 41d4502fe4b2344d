"""`lorafit resize`: the full rank is lossless, lower ranks keep names and load everywhere, dynamic rules."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors import safe_open
from toolbox_files import assert_loads_like, random_network, relative_error, updates

from lorafit.cli import main
from lorafit.networks.toolbox.network_file import read_network

FAMILIES = ("sd1", "sd2", "sdxl", "flux")


def _keys_and_meta(path):
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys()), dict(handle.metadata() or {})


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("family", FAMILIES)
def test_resize_to_the_full_rank_is_lossless_and_keeps_every_name(tiny_models, tmp_path, family, fmt):
    source = random_network(tiny_models[family], tmp_path / "in.safetensors", fmt, metadata={"ss_network_dim": "4"})
    out = tmp_path / "out.safetensors"
    before = read_network(source)
    full = max(m.rank for m in before.modules.values())  # Flux's fused kohya modules: 3 or 4 parts' ranks
    main(["resize", str(source), "--rank", str(full), "--out", str(out)])
    assert _keys_and_meta(out)[0] == _keys_and_meta(source)[0]
    after = read_network(out)
    for name, module in before.modules.items():
        resized = after.modules[name]
        # kohya's rule: each module keeps its scale alpha / rank (here the rank is unchanged, so its alpha).
        assert resized.alpha / resized.rank == pytest.approx(module.alpha / module.rank)
        assert relative_error(resized.delta_weight(), module.delta_weight()) < 1e-5, name


@pytest.mark.parametrize(
    "family, fmt", [(f, "kohya") for f in FAMILIES] + [(f, "diffusers") for f in ("sd1", "sdxl", "flux")]
)
def test_a_resized_file_loads_in_lorafit_and_diffusers_as_its_update(tiny_models, tmp_path, family, fmt):
    # One alpha for every module: diffusers 0.42's kohya loader scales modules whose alpha differs wrongly.
    source = random_network(tiny_models[family], tmp_path / "in.safetensors", fmt, alpha=4.0, rank=6)
    out = tmp_path / "out.safetensors"
    main(["resize", str(source), "--rank", "2", "--out", str(out)])
    assert {read_network(out).modules[n].rank for n in read_network(out).modules} == {2}
    assert_loads_like(out, tiny_models[family])
    # Rank 2 of 6: what was cut shows as a clear but partial difference from the input.
    cut, full = updates(out, tiny_models[family]), updates(source, tiny_models[family])
    errors = [relative_error(cut[k], full[k]) for k in full]
    assert 0.05 < max(errors) < 1.0


def test_dynamic_rules_choose_each_modules_rank_and_report_what_it_kept(tiny_models, tmp_path, capsys):
    from lorafit.networks.files import atomic_save_safetensors

    # Two modules with known spectra: singular values (8, 4, 2, 1) and (1, 1, 1, 1).
    q, _ = torch.linalg.qr(torch.randn(32, 4, generator=torch.Generator().manual_seed(0)))
    p, _ = torch.linalg.qr(torch.randn(32, 4, generator=torch.Generator().manual_seed(1)))
    stems = (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    )
    tensors = {}
    for stem, spectrum in zip(stems, ([8.0, 4.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0])):
        tensors[f"{stem}.lora_up.weight"] = q * torch.tensor(spectrum)
        tensors[f"{stem}.lora_down.weight"] = p.T.clone()
        tensors[f"{stem}.alpha"] = torch.tensor(2.0)  # scale 1/2, kept by the resize
    source = atomic_save_safetensors(tensors, tmp_path / "in.safetensors", {"ss_base_model_version": "sd_v1"})
    out, report = tmp_path / "out.safetensors", tmp_path / "report.csv"
    main(["resize", str(source), "--sv_fro", "0.95", "--out", str(out), "--report", str(report)])
    resized = read_network(out).modules
    assert resized[stems[0]].rank == 2 and resized[stems[1]].rank == 4  # sqrt(80/85) = 0.970; a flat spectrum keeps all
    assert resized[stems[0]].alpha == 1.0 and resized[stems[1]].alpha == 2.0
    rows = {r["module"]: r for r in csv.DictReader(report.open())}
    assert float(rows[stems[0]]["fro_kept"]) == pytest.approx((80 / 85) ** 0.5, abs=1e-5)
    assert rows[stems[0]]["block"] == "IN01" and rows[stems[1]]["block"] == "TE"
    printed = capsys.readouterr().out
    assert "Frobenius norm kept" in printed and "IN01" in printed
    assert _keys_and_meta(out)[1]["ss_network_dim"] == "Dynamic"


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_loha_and_lokr_become_lora_through_their_dense_update(tiny_models, tmp_path, kind, capsys):
    source = random_network(tiny_models["sd1"], tmp_path / "in.safetensors", kind=kind, rank=2, text_encoder=False)
    out = tmp_path / "out.safetensors"
    if kind == "loha":  # a LoHa's factors do not say whether a module is a Linear or a conv
        with pytest.raises(SystemExit):
            main(["resize", str(source), "--rank", "16", "--out", str(out)])
        assert "pass --base" in capsys.readouterr().err
    main(["resize", str(source), "--rank", "16", "--out", str(out), "--base", tiny_models["sd1"]])
    assert read_network(out).kinds == {"lora"}
    want, got = updates(source, tiny_models["sd1"]), updates(out, tiny_models["sd1"])
    # LoHa rank 2 has an update of rank <= 4, LoKr (2x2 kron rank 2) <= 4: rank 16 holds all of it.
    assert max(relative_error(got[k], want[k]) for k in want) < 1e-4
    assert _keys_and_meta(out)[1]["ss_network_module"] == "networks.lora"


def test_dora_keeps_its_magnitudes(tiny_models, tmp_path):
    source = random_network(tiny_models["sd1"], tmp_path / "in.safetensors", kind="dora", text_encoder=False)
    out = tmp_path / "out.safetensors"
    main(["resize", str(source), "--rank", "4", "--out", str(out)])
    before, after = read_network(source).modules, read_network(out).modules
    assert all(torch.equal(after[n].dora_scale, before[n].dora_scale) for n in before)
    want, got = updates(source, tiny_models["sd1"]), updates(out, tiny_models["sd1"])
    assert max(relative_error(got[k], want[k]) for k in want) < 1e-4


def test_locon_convolutions_take_conv_rank(tiny_models, tmp_path):
    source = random_network(tiny_models["sd1"], tmp_path / "in.safetensors", conv=True, text_encoder=False)
    out = tmp_path / "out.safetensors"
    main(["resize", str(source), "--rank", "3", "--conv_rank", "1", "--out", str(out)])
    modules = read_network(out).modules
    ranks = {m.down.dim() == 4 and m.down.shape[-1] == 3: m.rank for m in modules.values()}
    assert ranks == {True: 1, False: 3}
    assert_loads_like(out, tiny_models["sd1"], diffusers_too=False)
