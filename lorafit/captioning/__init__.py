"""Captioning a dataset: ``lorafit caption`` (BLIP-style image-to-text or a WD14 tagger) and the
tag-list helpers it shares with the ``lorafit review`` page."""
