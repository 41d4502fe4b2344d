"""Pivotal-tuning files (a LoRA with A1111's ``bundle_emb`` embedding keys) through the toolbox: resize,
merge, convert and inspect keep the embedding or say, in one warning, where it stays."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from toolbox_files import random_network

from lorafit.cli import main
from lorafit.networks.embedding_files import bundle_tensors, split_bundle


def _pivotal(model_dir: str, path, token: str = "ohwx", seed: int = 0, width: int = 32):
    """A kohya LoRA file with ``token``'s two vectors bundled, as lorafit's pivotal-tuning export writes it."""
    random_network(model_dir, path, "kohya", metadata={"ss_network_dim": "4"})
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(seed))
    save_file({**load_file(str(path)), **bundle_tensors(token, {"text_encoder": vectors})}, str(path))
    return path, vectors


def test_resize_and_merge_carry_the_embedding_into_the_new_file(tiny_models, tmp_path):
    source, vectors = _pivotal(tiny_models["sd1"], tmp_path / "pivotal.safetensors")
    plain = random_network(tiny_models["sd1"], tmp_path / "plain.safetensors", "kohya")
    main(["resize", str(source), "--rank", "2", "--out", str(tmp_path / "small.safetensors")])
    main(["merge", str(plain), f"{source}:0.5", "--out", str(tmp_path / "merged.safetensors")])
    for name in ("small", "merged"):
        lora, embeddings = split_bundle(load_file(str(tmp_path / f"{name}.safetensors")))
        assert lora, name
        assert list(embeddings) == ["ohwx"], name
        torch.testing.assert_close(embeddings["ohwx"]["text_encoder"], vectors, msg=name)


def test_two_different_embeddings_of_one_name_are_refused_in_one_line(tiny_models, tmp_path, capsys):
    a, _ = _pivotal(tiny_models["sd1"], tmp_path / "a.safetensors", seed=1)
    b, _ = _pivotal(tiny_models["sd1"], tmp_path / "b.safetensors", seed=2)
    with pytest.raises(SystemExit):
        main(["merge", str(a), str(b), "--out", str(tmp_path / "ab.safetensors")])
    err = capsys.readouterr().err.strip()
    assert "ohwx" in err and "a.safetensors" in err and "b.safetensors" in err and "\n" not in err
    assert not (tmp_path / "ab.safetensors").exists()


def test_outputs_without_a_place_for_embeddings_warn_where_they_stay(tiny_models, tmp_path, capsys):
    source, _ = _pivotal(tiny_models["sd1"], tmp_path / "pivotal.safetensors")
    main(["convert", str(source), str(tmp_path / "d.safetensors"), "--base", tiny_models["sd1"]])
    main(["merge", str(source), "--into", tiny_models["sd1"], "--out", str(tmp_path / "merged-model")])
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "has no place for the embedding(s) ohwx" in line]
    assert len(warnings) == 2 and all(str(source) in w for w in warnings), err
    assert "diffusers-format LoRA file" in warnings[0] and "merged base model" in warnings[1]
    main(["convert", str(source), str(tmp_path / "k.safetensors"), "--base", tiny_models["sd1"], "--to", "kohya"])
    assert list(split_bundle(load_file(str(tmp_path / "k.safetensors")))[1]) == ["ohwx"]


def test_inspect_lists_the_bundled_embedding(tiny_models, tmp_path, capsys):
    source, _ = _pivotal(tiny_models["sd1"], tmp_path / "pivotal.safetensors")
    main(["inspect", str(source)])
    out = capsys.readouterr().out
    assert "embeddings (bundled" in out and "ohwx: [2, 32]" in out


def test_load_lora_says_it_leaves_the_embedding_out_and_generates_loader_takes_both(tiny_models, tmp_path, caplog):
    from diffusers import DiffusionPipeline

    import lorafit
    from lorafit.inference.embeddings import load_lora_or_embedding

    pipe = DiffusionPipeline.from_pretrained(tiny_models["sd1"])
    source, _ = _pivotal(tiny_models["sd1"], tmp_path / "p.safetensors", width=pipe.text_encoder.config.hidden_size)
    with caplog.at_level("WARNING", logger="lorafit.lora"):
        lorafit.unload_lora(pipe, lorafit.load_lora(pipe, source))
        assert [r.getMessage() for r in caplog.records if "ohwx" in r.getMessage()] != []
        caplog.clear()
        name, embeddings = load_lora_or_embedding(pipe, source)
    assert name and list(embeddings) == ["ohwx"]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
