"""Sampler names (A1111/kohya style) -> diffusers schedulers built from the model's own config.

A scheduler is always built from the base model's ``scheduler_config`` (beta schedule, timestep
spacing, prediction type), so a v-prediction SD2 model samples as v-prediction whatever sampler
is picked; only the solver changes.
"""

from __future__ import annotations

from lorafit.errors import LorafitError

# name -> (diffusers class, extra config, the name A1111 writes in its "Sampler:" field)
_SAMPLERS = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "dpmpp_sde": ("DPMSolverSinglestepScheduler", {}, "DPM++ SDE"),
    # DDIM in latent space: clipping the predicted x0 to [-1, 1] (DDIM's pixel-space default,
    # used when the model's config does not say) would flatten latents, which span about +-4.
    "ddim": ("DDIMScheduler", {"clip_sample": False}, "DDIM"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "dpm_2": ("KDPM2DiscreteScheduler", {}, "DPM2"),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}, "DPM2 a"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
# kohya's ``sample_sampler`` spellings (``--ss`` in prompt files) that mean one of the above.
_ALIASES = {
    "k_euler": "euler",
    "k_euler_a": "euler_a",
    "dpmsolver++": "dpmpp_2m",
    "k_dpmpp_2m": "dpmpp_2m",
    "dpm++_2m": "dpmpp_2m",
    "dpmsingle": "dpmpp_sde",
    "k_dpm_2": "dpm_2",
    "k_dpm_2_a": "dpm_2_a",
    "plms": "pndm",
}
SAMPLER_NAMES = tuple(_SAMPLERS)
# Flow-matching models: their Euler, its stochastic form (fresh noise each step, as "ancestral"
# samplers do for DDPM models) and Heun.
_FLOW_SAMPLERS = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "euler_a": ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
}


def canonical_sampler(name: str, key: str = "sampler") -> str:
    """The canonical name of ``name`` (case-insensitive, kohya aliases accepted), or one-line error."""
    lowered = name.strip().lower()
    lowered = _ALIASES.get(lowered, lowered)
    if lowered not in _SAMPLERS:
        raise LorafitError(f"{key}: unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    return lowered


def display_name(name: str) -> str:
    """The sampler as A1111 names it in its ``parameters`` text ("Euler a", "DPM++ 2M")."""
    return _SAMPLERS[canonical_sampler(name)][2]


def make_scheduler(name: str, scheduler_config: dict, prediction_type: str | None = None):
    """A fresh diffusers scheduler for sampler ``name`` from the model's scheduler config.

    Fresh per image on purpose: multistep schedulers keep state between steps, and a reused one
    would make an image depend on what was sampled before it.
    """
    import diffusers

    if prediction_type == "flow":  # flow-matching models: their own Euler (or Heun) on sigmas
        chosen = canonical_sampler(name)
        if chosen not in _FLOW_SAMPLERS:
            raise LorafitError(
                f"sampler {name!r} works on DDPM models only; flow-matching models take {' or '.join(_FLOW_SAMPLERS)}"
            )
        class_name, extra = _FLOW_SAMPLERS[chosen]
        return getattr(diffusers, class_name).from_config(scheduler_config, **extra)
    class_name, extra, _ = _SAMPLERS[canonical_sampler(name)]
    overrides = dict(extra)
    if prediction_type:
        overrides["prediction_type"] = prediction_type
    return getattr(diffusers, class_name).from_config(scheduler_config, **overrides)
