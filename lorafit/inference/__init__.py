"""Looking at what a LoRA does: sample images, ``generate``, the epoch grid, selection metrics, ``probe``.

``render.py`` draws one image (a diffusers pipeline over a model's own parts); ``render_options.py``
holds the options every verb shares (the ``render``/``base`` groups); ``generate.py``;
``grid.py`` = ``grid_plan.py`` -> ``grid_cells.py`` -> ``grid_report.py`` (with ``selection_plan.py``,
``selection.py``, ``clip_scores.py`` for the metrics); ``probe.py`` = ``probe_plan.py`` -> draw ->
``probe_report.py`` (``probe_verdict.py``); prompts, samplers, PNG text, sheets, the HTML page,
``lora_specs.py`` (``--lora`` values) and ``progress.py`` beside them.
May import: ``lorafit.io``, ``lorafit.families``, ``lorafit.networks``, ``lorafit.data``.
"""
