"""The metadata of an extracted LoRA: what kohya's ``extract_lora_from_models.py`` records, and SAI's
``modelspec`` keys A1111/ComfyUI/civitai read (the base architecture, the title, where it came from)."""

from __future__ import annotations

import datetime
import json
import time

from lorafit import __version__
from lorafit.networks.lora_weights import LoraModuleWeights
from lorafit.networks.toolbox.base_layout import BaseLayout
from lorafit.networks.toolbox.low_rank import RankRule
from lorafit.networks.toolbox.network_file import uniform

_IMPLEMENTATION = {
    "sdxl": "https://github.com/Stability-AI/generative-models",
    "flux": "https://github.com/black-forest-labs/flux",
}


def _prediction_type(layout: BaseLayout) -> str:
    """The base's prediction type from its scheduler config (epsilon when it has none to read)."""
    if layout.spec.objective == "flow":
        return "flow"
    source = layout.config_source or layout.source
    try:
        from diffusers import DDPMScheduler

        return DDPMScheduler.load_config(source, subfolder="scheduler").get("prediction_type", "epsilon")
    except Exception:  # noqa: BLE001 -- no scheduler config to read: the family's usual type
        return "epsilon"


def extract_metadata(
    layout: BaseLayout,
    base: str,
    tuned: str,
    rule: RankRule,
    conv_rank: int | None,
    modules: dict[str, LoraModuleWeights],
) -> dict[str, str]:
    spec = layout.spec
    prediction = _prediction_type(layout)
    args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))} if conv_rank else {}
    meta = {
        "ss_network_module": "networks.lora_flux" if layout.family == "flux" else "networks.lora",
        "ss_network_dim": uniform(m.rank for m in modules.values()),
        "ss_network_alpha": uniform(m.alpha for m in modules.values()),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": spec.base_model_version,
        "ss_v2": str(layout.family == "sd2"),
        "ss_v_parameterization": str(prediction == "v_prediction"),
        "ss_sd_model_name": base,
        "ss_training_comment": f"extracted by lorafit {__version__} from {tuned} - {base}, {rule.describe()}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": spec.modelspec_architecture(prediction),
        "modelspec.implementation": _IMPLEMENTATION.get(layout.family, "diffusers"),
        "modelspec.title": f"{tuned} - {base}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(time.time())).isoformat(),
    }
    if prediction in ("epsilon", "v_prediction"):
        meta["modelspec.prediction_type"] = {"v_prediction": "v", "epsilon": "epsilon"}[prediction]
    return meta
