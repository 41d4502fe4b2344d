#!/usr/bin/env bash
# The README's main command: install, write the toy world's star pictures (offline, only if
# absent), then train a LoRA with configs/demo.yaml on the CPU that teaches the shipped toy base
# model (lorafit/toyworld/base: circles, squares, triangles) to draw a star for the trigger "ohwx".
# Extra arguments go to `lorafit fit`, e.g. `bash tools/demo.sh --trainer.max_epochs 8`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || . .venv/bin/activate
export HF_HUB_OFFLINE=1
# One torch thread unless you say otherwise: the toy model is too small to gain from intra-op
# threads (on a busy 2-core machine the first demo took 183 s of CPU with one, 445 s with two;
# docs/toyworld.md).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

lorafit toy-data demo/toy-data         # kohya-style folder: demo/toy-data/10_ohwx (stars) + 1_world (prior), .png + .txt
lorafit fit --config configs/demo.yaml "$@"

echo
echo "Demo done. LoRA files (kohya format for A1111/ComfyUI, diffusers format under diffusers/):"
ls -1 runs/demo/lora runs/demo/lora/diffusers
echo "Resolved config: runs/demo/config.yaml   TensorBoard: tensorboard --logdir runs/demo"
echo "Measure what it learnt (stars for 'ohwx', the world kept without it):"
echo "  python tools/bench_toyworld.py --run runs/demo"
