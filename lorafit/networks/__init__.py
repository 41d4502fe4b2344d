"""Adapters over PEFT and their files: presets, network types, kohya/LyCORIS and diffusers
formats, loading into pipelines at a strength, conversion, metadata.

May import: ``lorafit.errors``, ``lorafit.io``, ``lorafit.families``.
"""
