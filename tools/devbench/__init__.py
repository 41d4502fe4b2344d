"""Developer tools of the benchmark, outside the wheel: the peak-memory ESTIMATE on fake tensors.

``memory.py`` counts lorafit's training step at full size on fake tensors (``tools/bench.py
--estimate-memory``, docs/memory-estimate.md); ``cuda_autocast.py`` gives CPU autocast CUDA's op
lists for it. They read torch internals (``torch._C`` dispatch, ``MemTracker``) to estimate what
one GPU run measures, so they live here rather than in ``lorafit/``. Import with ``tools/`` on
``sys.path`` (tools/bench.py and the tests put it there).
"""
