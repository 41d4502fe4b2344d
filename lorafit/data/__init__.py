"""Images and captions to batches: kohya folders, ``prepare`` (webdataset shards + report),
``cache`` (latents / text embeddings), buckets, caption ops, the DDP-safe streaming data module.

May import: ``lorafit.errors``, ``lorafit.io``, ``lorafit.families`` (cache encodes with the model).
"""
