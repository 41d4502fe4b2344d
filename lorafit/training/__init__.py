"""The LightningModule and what only it uses.

``module.py`` (orchestration), the denoising step and its maths (``denoising.py``, ``losses.py``),
optimizers and schedulers (``optim.py``), the NaN/Inf guard (``nonfinite.py``), what a checkpoint
holds and the rules for resuming (``checkpoint_state.py``, ``rng_state.py``, ``resume_settings.py``,
``checkpoint_io.py``), parts kept off the device (``host_parts.py``), speed settings (``speed.py``).
May import every lower layer (errors, io, distributed, families, networks, data); never callbacks
or the CLI.
"""
