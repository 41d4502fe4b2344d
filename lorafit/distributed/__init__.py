"""Collectives and host read-backs that never make the host wait for the accelerator.

``collectives.py``: all-reduce without Lightning's barrier; ``host_readback.py``: device values copied
to pinned host memory and read a step later.
May import: ``lorafit.errors``, ``lorafit.io``.
"""
