"""The LoRA toolbox: ``lorafit inspect``, ``resize``, ``merge`` and ``extract`` (kohya's resize_lora,
merge_lora/svd_merge_lora and extract_lora_from_models, for every family and both file formats).

``low_rank`` holds the shared maths (SVD of a LoRA product or a dense update, the rank rules,
the energy kept); ``network_file`` a network file as the verbs work on it (modules by their names
in the file, so outputs keep the input's names); ``base_layout`` a base model's names and shapes
from its configs; ``model_files`` and ``checkpoint_keys`` read a model's weights one tensor at a
time from a diffusers directory or a single file, and ``safetensors_stream`` writes one that way,
so merging into or extracting from a full SDXL or Flux never holds a whole model in memory.
One module per verb: ``inspect_file``, ``resize``, ``merge`` (several LoRAs into one:
``merge_networks``; into a base model: ``bake``), ``extract``.

May import: ``lorafit.errors``, ``lorafit.io``, ``lorafit.families`` and ``lorafit.networks``.
"""
