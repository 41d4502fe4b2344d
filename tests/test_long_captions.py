"""kohya's ``max_token_length``: captions and prompts beyond CLIP's 75 tokens, in 75-token chunks.

Without it, everything after the 75th caption token is cut (diffusers' and kohya's default); with
it, those words reach the UNet in training, in the sample images and in ``lorafit generate``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from training import tiny_batch, train

from lorafit.families.clip_text import encode_tokens, tokenize
from lorafit.families.loading import load_base_model
from lorafit.inference.prompts import SamplePrompt
from lorafit.inference.render import Renderer

# The tiny tokenizers are byte-level (a token per character, spaces excepted): HEAD is ~100 tokens,
# past the first 75-token chunk, and the two captions differ only after it.
HEAD = "a photo of ohwx dog, " + "grass, " * 14
LONG_A, LONG_B = HEAD + "red collar", HEAD + "blue collar"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])  # SDXL's second tokenizer pads with "!", not the end token
def test_chunks_frame_75_caption_tokens_each_with_start_and_end(family, tiny_models):
    base = load_base_model(tiny_models[family])
    for tokenizer, ids in zip(base.tokenizers, tokenize(base.tokenizers, [LONG_A, "short"], max_token_length=150)):
        assert ids.shape == (2, 2, 77)
        start, end, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        assert (ids[:, :, 0] == start).all()
        # The long caption: all its tokens, 75 per chunk.
        plain = tokenizer(LONG_A).input_ids[1:-1]
        body = ids[0, :, 1:-1].reshape(-1).tolist()
        assert 75 < len(plain) <= 150 and body[: len(plain)] == plain and set(body[len(plain) :]) <= {end, pad}
        assert ids[0, 0, -1] == end  # the first chunk, cut inside the caption, is closed by the end token
        assert end in ids[0, 1, 1:].tolist()  # the second holds the caption's own end
        # The short one: its tokens then end/padding; its empty second chunk reads as an empty prompt.
        assert ids[1, 1, 1] == end and set(ids[1, 1, 2:].tolist()) <= {end, pad}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_words_after_75_tokens_reach_the_text_conditioning_only_with_max_token_length(family, tiny_models):
    base = load_base_model(tiny_models[family])

    def conditioning(max_token_length):
        ids = tokenize(base.tokenizers, [LONG_A, LONG_B], max_token_length=max_token_length)
        return encode_tokens(family, base.text_encoders, ids)

    with torch.no_grad():
        cut, chunked = conditioning(None), conditioning(150)
    assert torch.equal(cut.hidden_states[0], cut.hidden_states[1])  # cut at 75: the collar is lost
    assert chunked.hidden_states.shape[1] == 1 + 150 + 1  # start, 2 x 75 caption tokens, end
    assert not torch.allclose(chunked.hidden_states[0], chunked.hidden_states[1])
    # The first chunk is encoded exactly as a 75-token caption would be (same start, same tokens).
    assert torch.allclose(chunked.hidden_states[:, :76], cut.hidden_states[:, :76], atol=1e-5)
    if family == "sdxl":  # pooled embedding: the first chunk's, as kohya takes it
        assert torch.allclose(chunked.pooled, cut.pooled, atol=1e-5)


def test_training_samples_and_files_use_the_long_captions(tiny_models, demo_data, tmp_path):
    _trainer, module = train(
        tiny_models["sdxl"], demo_data, tmp_path, max_steps=2, max_token_length=150, train_text_encoder=True
    )
    with safe_open(str(tmp_path / "lora" / "test.safetensors"), framework="pt") as f:
        assert f.metadata()["ss_max_token_length"] == "150"
    batch = tiny_batch(demo_data, 2)
    batch["captions"] = [LONG_A, LONG_B]
    with torch.no_grad():
        assert module.text_conditioning(batch)["prompt_embeds"].shape[1] == 152

    renderer = Renderer(module.base, max_token_length=150)
    request = SamplePrompt(
        prompt=LONG_A, negative_prompt="", steps=2, cfg=5.0, width=64, height=64, seed=1, sampler="euler"
    )
    first, other = renderer(request), renderer(replace(request, prompt=LONG_B))
    assert first.size == (64, 64) and list(first.getdata()) != list(other.getdata())
    # Without max_token_length the tail of the prompt is cut, so both prompts give the same image.
    cut = Renderer(module.base)
    assert list(cut(request).getdata()) == list(cut(replace(request, prompt=LONG_B)).getdata())


def test_generate_reads_long_prompts_with_max_token_length(tiny_models, tmp_path):
    from PIL import Image

    from lorafit.inference.generate import generate
    from lorafit.inference.render_options import BaseModelOptions, RenderOptions

    def pixels(prompt, out, **kwargs):
        [path] = generate(
            model=tiny_models["sd1"],
            prompt=prompt,
            render=RenderOptions(seed=3, steps=2, width=64, height=64, sampler="euler", **kwargs),
            out=str(tmp_path / out),
            base=BaseModelOptions(device="cpu"),
        )
        return list(Image.open(path).getdata())

    assert pixels(LONG_A, "a", max_token_length=150) != pixels(LONG_B, "b", max_token_length=150)
    assert pixels(LONG_A, "c") == pixels(LONG_B, "d")  # cut at 75 tokens: the collar never reaches the UNet
