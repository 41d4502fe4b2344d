"""Output-preserving prior (ai-toolkit's differential output preservation): the step adds the squared
difference between the LoRA's and the frozen base's predictions for the class prompt, on the step's
own noisy latents; it trains, resumes exactly and leaves the adapters' trainable flags as they were."""

from __future__ import annotations

import pytest
import torch
from training import logged_metrics, tiny_batch, train

from lorafit.errors import LorafitError
from lorafit.networks.adapter_switch import adapters_disabled
from lorafit.training.config import PriorConfig
from lorafit.training.module import LoraDiffusionModule
from lorafit.training.output_prior import OutputPrior

PRIOR = {"weight": 0.5, "class_word": "shape", "trigger": "ohwx"}


def test_the_class_prompt_replaces_the_trigger_as_a_whole_word():
    prior = OutputPrior(PriorConfig(1.0, "dog"), "ohwx")
    assert prior.class_captions(["ohwx, a photo", "a ohwx dog", "ohwxy and xohwx", "OHWX"]) == [
        "dog, a photo",
        "a dog dog",
        "ohwxy and xohwx",
        "OHWX",
    ]


def _module(model: str, **kwargs) -> LoraDiffusionModule:
    module = LoraDiffusionModule(model=model, rank=4, **kwargs)
    module.configure_model()
    module.train()
    return module


def _perturb(module: LoraDiffusionModule) -> None:
    generator = torch.Generator().manual_seed(0)
    for name, p in module.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: the LoRA would equal the base
            p.data = torch.randn(p.shape, generator=generator) * 0.05


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_the_prior_term_is_the_loras_distance_to_the_base_on_the_class_prompt(family, tiny_models, demo_data):
    batch = tiny_batch(demo_data, 2)
    model = tiny_models[family]
    with_prior, without = _module(model, prior=PRIOR), _module(model)
    with torch.no_grad():  # a fresh LoRA is the base: nothing to preserve yet
        torch.testing.assert_close(
            with_prior.denoising_loss(batch, torch.Generator().manual_seed(1)),
            without.denoising_loss(batch, torch.Generator().manual_seed(1)),
        )
    _perturb(with_prior)
    without.load_state_dict(with_prior.state_dict(), strict=False)
    with torch.no_grad():
        term = with_prior.denoising_loss(batch, torch.Generator().manual_seed(1)) - without.denoising_loss(
            batch, torch.Generator().manual_seed(1)
        )
        # Written out: the step's draw, the class captions, the denoiser with and without its adapters.
        step, device = without.step, without.device
        generator = torch.Generator().manual_seed(1)
        draw = step.objective.draw(step.latents(batch, generator, device), generator)
        captions = [c.replace("ohwx", "shape") for c in batch["captions"]]
        assert captions != batch["captions"]
        conditioning = step.family.encode_text(step.base, captions, step.options, device)
        lora = step.family.predict(step.base, draw.noisy, draw.timesteps, conditioning, batch, step.options)
        with adapters_disabled(list(without.lora_components().values())):
            base = step.family.predict(step.base, draw.noisy, draw.timesteps, conditioning, batch, step.options)
    assert term.item() > 0
    torch.testing.assert_close(term, 0.5 * ((lora - base) ** 2).mean(), rtol=1e-4, atol=1e-7)


def test_a_prior_run_trains_resumes_exactly_and_keeps_frozen_adapters_frozen(tiny_models, demo_data, tmp_path):
    """SDXL with text-encoder LoRA: its CLIP-L last layer stays frozen through the prior's adapter
    switching (else DDP would stop on unused parameters), and the run resumes bit for bit."""
    kwargs = dict(batch_size=2, learning_rate=5e-3, train_text_encoder=True, prior=PRIOR, log_metrics=True)
    fresh = _module(tiny_models["sdxl"], train_text_encoder=True, prior=PRIOR)
    frozen = {name for name, p in fresh.named_parameters() if ".default" in name and not p.requires_grad}
    assert frozen
    _, straight = train(tiny_models["sdxl"], demo_data, tmp_path / "straight", max_epochs=2, **kwargs)
    assert {name for name, p in straight.named_parameters() if ".default" in name and not p.requires_grad} == frozen
    assert logged_metrics(tmp_path / "straight", "loss/prior")  # its part of the loss is logged on its own
    train(tiny_models["sdxl"], demo_data, tmp_path / "stopped", max_epochs=1, **kwargs)
    checkpoint = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    _, resumed = train(
        tiny_models["sdxl"], demo_data, tmp_path / "stopped", max_epochs=2, ckpt_path=str(checkpoint), seed=5, **kwargs
    )
    a = {k: v for k, v in straight.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in resumed.state_dict().items() if "lora_" in k}
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed prior run diverged"


def test_the_trigger_defaults_to_the_datas_trigger_word(tiny_models, demo_data, tmp_path):
    trainer, module = train(
        tiny_models["sd1"],
        demo_data,
        tmp_path,
        max_steps=1,
        prior={"weight": 1.0, "class_word": "star"},
        data_kwargs={"trigger_word": "ohwx"},
    )
    assert module.step.prior.trigger == "ohwx" and trainer.global_step == 1


@pytest.mark.parametrize(
    ("prior", "message"),
    [
        ({"weight": -1.0}, r"^model\.prior\.weight: -1\.0 is negative"),
        ({"weight": 1.0}, r"^model\.prior\.class_word: .* needs the class"),
    ],
)
def test_impossible_prior_settings_are_refused_in_one_line(prior, message, tiny_models):
    with pytest.raises(LorafitError, match=message):
        LoraDiffusionModule(model=tiny_models["sd1"], prior=prior)


def test_a_prior_without_a_trigger_word_or_on_cached_text_is_refused(tiny_models):
    module = LoraDiffusionModule(model=tiny_models["sd1"], prior={"weight": 1.0, "class_word": "dog"})
    with pytest.raises(LorafitError, match=r"^model\.prior\.trigger: .*set model\.prior\.trigger"):
        module.configure_model()
    module = _module(tiny_models["sd1"], prior=PRIOR)
    with pytest.raises(LorafitError, match=r"cached text embeddings"):
        module.check_cache({"family": "sd1", "model": tiny_models["sd1"], "text_embeddings": True})
