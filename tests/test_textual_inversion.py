"""Textual inversion and pivotal tuning: only the new token's vectors train, the files load in diffusers
(and have the A1111/ComfyUI/kohya layouts) with the text-encoder output training had, the pivotal
bundle loads in generate and grid, the vectors freeze when asked and runs resume exactly."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training import train

from lorafit.errors import LorafitError
from lorafit.networks.embedding_files import read_embedding_file
from lorafit.training.module import LoraDiffusionModule
from lorafit.training.token_embeddings import expand_token, initial_vectors

CAPTION = "ohwx star, a large yellow star on a black background"
TI = {"token": "ohwx", "init_word": "yellow star", "vectors": 2, "learning_rate": 5e-2}


def _pipeline(model: str):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model)


def _train(model: str, data: str, root, pivotal: bool = False, **kwargs):
    settings = dict(embedding=TI, max_steps=3)
    if not pivotal:
        settings["optimizer"] = {"denoiser_lr": 0}  # textual inversion alone: no LoRA
    return train(model, data, root, **{**settings, **kwargs})


@pytest.mark.slow
@pytest.mark.parametrize(("family", "pivotal"), [("sd1", False), ("sdxl", True)])
def test_only_the_new_tokens_vectors_train(family, pivotal, tiny_models, demo_data, tmp_path):
    _, module = _train(tiny_models[family], demo_data, tmp_path, pivotal=pivotal)
    fresh = _pipeline(tiny_models[family])
    components = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    assert sorted(module.trained_tokens.vectors) == components
    for index, component in enumerate(components):
        frozen = getattr(fresh, component).get_input_embeddings().weight
        trained = module.text_encoders[index].get_input_embeddings()
        assert torch.equal(trained.weight, frozen), f"{component}: a row of the vocabulary changed"
        tokenizer = getattr(fresh, component.replace("text_encoder", "tokenizer"))
        start = initial_vectors(tokenizer, frozen, TI["init_word"], 2, "init_word")
        # Started from "yellow" and "star" (A1111's spread of the init word's tokens over the vectors)
        ids = tokenizer("yellow star", add_special_tokens=False).input_ids
        assert torch.equal(start[0], frozen[ids[0]].float()) and torch.equal(
            start[1], frozen[ids[len(ids) // 2]].float()
        )
        assert not torch.allclose(module.trained_tokens.vectors[component].detach(), start), "the vectors did not train"
        # Every other text-encoder weight is the base's too
        base = dict(getattr(fresh, component).named_parameters())
        for name, p in module.text_encoders[index].named_parameters():
            if ".default" not in name:
                assert torch.equal(p, base[name.replace("token_embedding.base.", "token_embedding.")]), name
    # The optimizer holds the vectors in a group of their own, nothing of the vocabulary
    group = next(g for g in module.trainer.optimizers[0].param_groups if g["name"] == "embedding")
    assert [p.shape for p in group["params"]] == [v.shape for v in module.trained_tokens.vectors.values()]
    assert group["lr"] == TI["learning_rate"]
    with safe_open(str(tmp_path / "lora" / "test.safetensors"), framework="pt") as handle:
        network_keys = sorted(k for k in (handle.metadata() or {}) if k.startswith("ss_network_"))
    # A textual-inversion-only file records no network it does not hold (A1111 shows these as the LoRA's settings).
    assert bool(network_keys) == pivotal, network_keys


def _training_conditioning(module: LoraDiffusionModule, caption: str) -> dict:
    with torch.no_grad():
        return module.text_conditioning({"captions": [caption]})


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_one_encoder_files_load_in_diffusers_and_encode_as_in_training(family, tiny_models, demo_data, tmp_path):
    _, module = _train(tiny_models[family], demo_data, tmp_path)
    expected = _training_conditioning(module, CAPTION)["prompt_embeds"]
    folder = tmp_path / "lora" / "embeddings"
    vectors = module.trained_tokens.vectors["text_encoder"].detach()

    # diffusers' own format: the key is the token
    diffusers_file = load_file(folder / "diffusers" / "ohwx.safetensors")
    assert list(diffusers_file) == ["ohwx"] and torch.equal(diffusers_file["ohwx"], vectors)
    pipe = _pipeline(tiny_models[family])
    pipe.load_textual_inversion(str(folder / "diffusers" / "ohwx.safetensors"))
    embeds, _ = pipe.encode_prompt(CAPTION, "cpu", 1, False)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=1e-6)

    # A1111/ComfyUI/kohya's one-tensor layout; diffusers reads it with the token given
    a1111 = folder / "ohwx.safetensors"
    assert list(load_file(a1111)) == ["emb_params"] and torch.equal(load_file(a1111)["emb_params"], vectors)
    with safe_open(str(a1111), framework="pt") as handle:
        assert handle.metadata()["lorafit_token"] == "ohwx"
    pipe = _pipeline(tiny_models[family])
    pipe.load_textual_inversion(str(a1111), token="ohwx")
    torch.testing.assert_close(pipe.encode_prompt(CAPTION, "cpu", 1, False)[0], expected, rtol=0, atol=1e-6)

    # The textual-inversion run's "LoRA" file is A1111's bundle: bundle_emb.<token>.string_to_param.*
    bundle = load_file(tmp_path / "lora" / "test.safetensors")
    assert list(bundle) == ["bundle_emb.ohwx.string_to_param.*"] and torch.equal(bundle[next(iter(bundle))], vectors)
    token, read = read_embedding_file(tmp_path / "lora" / "test.safetensors")
    assert token == "ohwx" and list(read) == ["text_encoder"] and torch.equal(read["text_encoder"], vectors)


@pytest.mark.slow
def test_sdxl_file_loads_into_both_encoders_and_encodes_as_in_training(tiny_models, demo_data, tmp_path):
    _, module = _train(tiny_models["sdxl"], demo_data, tmp_path)
    expected = _training_conditioning(module, CAPTION)
    path = tmp_path / "lora" / "embeddings" / "ohwx.safetensors"
    state = load_file(path)
    assert sorted(state) == ["clip_g", "clip_l"]  # A1111 and kohya need both, ComfyUI picks its encoder's
    assert torch.equal(state["clip_l"], module.trained_tokens.vectors["text_encoder"].detach())
    assert torch.equal(state["clip_g"], module.trained_tokens.vectors["text_encoder_2"].detach())
    assert not (tmp_path / "lora" / "embeddings" / "diffusers").exists()  # diffusers loads the file above
    pipe = _pipeline(tiny_models["sdxl"])
    # diffusers' documented way for SDXL embeddings: each key into its encoder
    pipe.load_textual_inversion(state["clip_l"], token="ohwx", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(
        state["clip_g"], token="ohwx", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    embeds, _, pooled, _ = pipe.encode_prompt(CAPTION, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds, expected["prompt_embeds"], rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, expected["pooled_prompt_embeds"], rtol=0, atol=1e-6)
    bundle = load_file(tmp_path / "lora" / "test.safetensors")
    assert sorted(bundle) == ["bundle_emb.ohwx.clip_g", "bundle_emb.ohwx.clip_l"]


@pytest.mark.slow
def test_the_pivotal_bundle_loads_in_generate_and_grid(tiny_models, demo_data, tmp_path):
    from lorafit.inference.generate import apply_loras, generate, load_renderer
    from lorafit.inference.grid import grid
    from lorafit.inference.png_info import AppliedLora
    from lorafit.inference.prompts import SamplePrompt
    from lorafit.networks.loading import loaded_loras

    model = tiny_models["sd1"]
    _, module = _train(model, demo_data, tmp_path / "run", pivotal=True)
    path = tmp_path / "run" / "lora" / "test.safetensors"
    keys = set(load_file(path))
    assert "bundle_emb.ohwx.string_to_param.*" in keys and any(k.startswith("lora_unet_") for k in keys)
    renderer = load_renderer(model)
    names = apply_loras(renderer, [AppliedLora(str(path), 1.0)])
    assert list(loaded_loras(renderer.pipe)) == names and len(names) == 1  # the LoRA, and
    encoded = renderer.encode(SamplePrompt(CAPTION, negative_prompt="", cfg=1.0))  # the embedding, as trained
    torch.testing.assert_close(
        encoded["prompt_embeds"], _training_conditioning(module, CAPTION)["prompt_embeds"], rtol=0, atol=1e-6
    )
    written = generate(model, "ohwx star --s 2 --w 64 --h 64", lora=[str(path)], out=str(tmp_path / "out"))
    assert len(written) == 1 and written[0].is_file()
    # the grid loads each epoch's bundle and unloads it again (same token every epoch)
    grid(model, lora=[str(path)], prompt=["ohwx star --s 2 --w 64 --h 64"], out=str(tmp_path / "grid"))
    assert list((tmp_path / "grid").rglob("*.png"))


@pytest.mark.slow
def test_pivotal_vectors_freeze_after_n_steps_and_the_run_resumes_exactly(tiny_models, demo_data, tmp_path):
    class Record(pl.Callback):
        def __init__(self):
            self.vectors = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.vectors[trainer.global_step] = pl_module.trained_tokens.vectors["text_encoder"].detach().clone()

    settings = dict(embedding={**TI, "freeze_after": 2}, max_steps=-1, max_epochs=2, batch_size=4)
    record = Record()
    model = tiny_models["sd1"]
    _, straight = _train(model, demo_data, tmp_path / "straight", pivotal=True, callbacks=[record], **settings)
    steps = sorted(record.vectors)
    assert len(steps) > 3
    assert not torch.equal(record.vectors[1], record.vectors[2])  # trained up to step 2
    assert all(torch.equal(record.vectors[2], record.vectors[s]) for s in steps[2:])  # then fixed
    _train(model, demo_data, tmp_path / "stopped", pivotal=True, **{**settings, "max_epochs": 1})
    checkpoint = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert any(k.startswith("trained_tokens.vectors.") for k in torch.load(checkpoint, weights_only=True)["state_dict"])
    _, resumed = _train(
        model, demo_data, tmp_path / "stopped", pivotal=True, ckpt_path=str(checkpoint), seed=5, **settings
    )
    a = {k: v for k, v in straight.state_dict().items() if "lora_" in k or "trained_tokens" in k}
    b = {k: v for k, v in resumed.state_dict().items() if "lora_" in k or "trained_tokens" in k}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed pivotal run diverged"


def test_multi_vector_captions_expand_as_diffusers_expands_prompts(tiny_models):
    from diffusers.loaders import TextualInversionLoaderMixin

    pipe = _pipeline(tiny_models["sd1"])
    pipe.load_textual_inversion(torch.zeros(3, 32), token="ohwx")
    for text in [CAPTION, "a photo of ohwx, ohwx again", "no token here"]:
        assert expand_token(text, "ohwx", 3) == TextualInversionLoaderMixin.maybe_convert_prompt(
            pipe, text, pipe.tokenizer
        )


@pytest.mark.parametrize(
    ("embedding", "message"),
    [
        ({"token": "Ohwx Dog"}, r"^model\.embedding\.token: 'Ohwx Dog'; use one lowercase word"),
        ({"token": "ohwx", "vectors": 0}, r"^model\.embedding\.vectors: 0"),
        ({"init_word": "dog"}, r"^model\.embedding\.init_word is set but model\.embedding\.token is empty"),
        ({"vectors": 4}, r"^model\.embedding\.vectors is set but model\.embedding\.token is empty"),
        ({"token": "ohwx", "freeze_after": 0}, r"^model\.embedding\.freeze_after: 0"),
    ],
)
def test_impossible_embedding_settings_are_refused_in_one_line(embedding, message, tiny_models):
    with pytest.raises(LorafitError, match=message):
        LoraDiffusionModule(model=tiny_models["sd1"], embedding=embedding)


def test_a_known_word_flux_or_cached_text_is_refused(tiny_models):
    module = LoraDiffusionModule(model=tiny_models["sd1"], embedding={"token": "a"})  # a word of the tiny vocabulary
    with pytest.raises(LorafitError, match=r"^model\.embedding\.token: 'a' is already a token"):
        module.configure_model()
    module = LoraDiffusionModule(model=tiny_models["flux"], embedding={"token": "ohwx"})
    with pytest.raises(LorafitError, match=r"^model\.embedding\.token: textual inversion is for SD1/SD2/SDXL"):
        module.configure_model()
    module = LoraDiffusionModule(model=tiny_models["sd1"], embedding={"token": "ohwx"})
    module.configure_model()
    with pytest.raises(LorafitError, match=r"cached text embeddings"):
        module.check_cache({"family": "sd1", "model": tiny_models["sd1"], "text_embeddings": True})


def test_resuming_with_another_token_or_vector_count_is_refused_in_one_line(tiny_models):
    from lorafit.training.resume_settings import changed_network_settings

    saved = LoraDiffusionModule(model=tiny_models["sd1"], embedding=TI).hparams
    same = LoraDiffusionModule(model=tiny_models["sd1"], embedding={**TI, "learning_rate": 1e-3, "freeze_after": 9})
    assert changed_network_settings(saved, same.hparams) == []  # rates and the freeze may change on resume
    more = LoraDiffusionModule(model=tiny_models["sd1"], embedding={**TI, "vectors": 3})
    assert changed_network_settings(saved, more.hparams) == [("embedding.vectors", 2, 3)]
    off = LoraDiffusionModule(model=tiny_models["sd1"])
    changed = changed_network_settings(saved, off.hparams)
    assert changed == [("embedding.token", "ohwx", None), ("embedding.vectors", 2, 1)]


@pytest.mark.slow
def test_clip_skip_rendering_expands_the_multi_vector_token_as_training_does(tiny_models, demo_data, tmp_path):
    """lorafit encodes clip-skip and long prompts itself (render.py); the embedding's ``ohwx ohwx_1`` must
    be written out there too, or generation reads one vector where training read two."""
    from lorafit.inference.generate import apply_loras, load_renderer
    from lorafit.inference.png_info import AppliedLora
    from lorafit.inference.prompts import SamplePrompt
    from lorafit.inference.render_options import RenderOptions

    model = tiny_models["sd1"]
    _, module = _train(model, demo_data, tmp_path, conditioning={"clip_skip": 2})
    renderer = load_renderer(model, render=RenderOptions(clip_skip=2))
    assert apply_loras(renderer, [AppliedLora(str(tmp_path / "lora" / "test.safetensors"), 1.0)]) == []  # no LoRA
    encoded = renderer.encode(SamplePrompt(CAPTION, negative_prompt="", cfg=1.0))
    expected = _training_conditioning(module, CAPTION)["prompt_embeds"]
    torch.testing.assert_close(encoded["prompt_embeds"], expected, rtol=0, atol=1e-6)


def test_captions_without_the_token_get_one_warning(tiny_models, caplog):
    module = LoraDiffusionModule(model=tiny_models["sd1"], embedding={"token": "ohwx", "vectors": 2})
    module.configure_model()
    with caplog.at_level("WARNING", logger="lorafit.train"):
        assert module.trained_tokens.expand(["a dog", "a cat"]) == ["a dog", "a cat"]
        assert module.trained_tokens.expand(["a dog"]) == ["a dog"]
    warnings = [r.getMessage() for r in caplog.records if "model.embedding.token" in r.getMessage()]
    assert len(warnings) == 1 and "none of the first batch's captions" in warnings[0]
    assert module.trained_tokens.expand(["ohwx dog"]) == ["ohwx ohwx_1 dog"]


def test_the_samples_base_side_shows_nothing_the_run_learnt(tiny_models, demo_data, tmp_path):
    """samples.compare_base on a textual-inversion run: the base-model side encodes the token with the
    vectors training began from, so it stays the same image while the trained side changes."""
    import numpy as np
    from PIL import Image

    from lorafit.callbacks.samples import SampleImages
    from lorafit.inference.render_options import RenderOptions

    samples = SampleImages(
        prompts=["ohwx star, a yellow star --s 2 --d 5"],
        render=RenderOptions(steps=2),
        before_training=True,
        compare_base=True,
    )
    _train(tiny_models["sd1"], demo_data, tmp_path, max_steps=-1, max_epochs=1, callbacks=[samples])
    before, after = sorted((tmp_path / "samples").glob("*.png"))
    assert before.name.startswith("epoch-000_") and after.name.startswith("epoch-001_")

    def sides(path):  # the base-model and trained cells (64 px; 4 px gaps, labels above)
        image = np.asarray(Image.open(path).convert("RGB")).astype(int)
        top = image.shape[0] - 4 - 64
        return image[top : top + 64, 4:68], image[top : top + 64, 72:136]

    (base_before, trained_before), (base_after, trained_after) = sides(before), sides(after)
    assert np.array_equal(base_before, trained_before), "before training both sides are the base"
    assert np.abs(trained_after - trained_before).max() > 8, "the trained vectors change the image"
    assert np.array_equal(base_after, base_before), "the base side does not show the learnt vectors"
