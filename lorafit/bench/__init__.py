"""Training-step benchmark on the real SD1.5/SDXL architectures with random weights (tools/bench.py).

architectures: published configs -> random-weight models; module: lorafit's module on them;
flops: FlopCounter counts on meta; settings: the grid and presets; runner: lorafit's Lightning step
and the plain reference loop timed side by side; host_syncs: how often a step makes the host wait;
devices: clocks, memory, peaks; report: rows. The peak-memory ESTIMATE on fake tensors is a
developer tool outside the wheel: tools/devbench/.
"""
