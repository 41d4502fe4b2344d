"""The LightningModule and what only it uses.

``module.py`` (orchestration) with its settings groups (``config.py``; the flat keys of earlier
versions: ``legacy_keys.py``); the denoising step (``step.py``) and its objectives (``ddpm.py``,
``flow_matching.py``, ``losses.py``, ``masked_loss.py``); teaching methods beside the plain LoRA: the output-preserving
prior (``output_prior.py``), textual inversion and pivotal tuning (``token_embeddings.py``), concept
sliders (``slider.py``), text-encoder layers no conditioning reads (``text_encoders.py``);
optimizers and schedulers (``optim.py``), the NaN/Inf guard (``nonfinite.py``), what a checkpoint
holds and the rules for resuming (``checkpoint_state.py``, ``rng_state.py``, ``resume_settings.py``,
``checkpoint_io.py``), parts kept off the device (``host_parts.py``), speed settings (``speed.py``).
May import every lower layer (errors, io, distributed, families, networks, data); never callbacks
or the CLI.
"""
