#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): random-weight LLaVA-1.5-7B and Qwen2-VL-2B in bf16 at
# budgets 576/192/128/64 for every built-in method, under SDPA's flash kernel and flash_attention_2
# (when flash-attn is installed), timed with CUDA events; then its video part (benchmarks/gpu_video.sh:
# Video-LLaVA-7B and LLaVA-OneVision-7B, the video methods, DyCoke's decode stage). Extra arguments go
# to gpu_check.py; --dry-run runs both parts' tiny CPU variants.
# Exit status: 0 every arm ran, 1 an arm crashed, 2 no CUDA here (or bad arguments).
#   benchmarks/gpu.sh                               # on a CUDA machine
#   benchmarks/gpu.sh --device cpu --dry-run        # tiny widths on CPU: checks the code path
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"${PYTHON:-python}" "$here/gpu_check.py" --model-config llava-1.5-7b --model-config qwen2-vl-2b "$@"
images=$?
case " $* " in
  *" --dry-run "*) bash "$here/gpu_video.sh" --dry-run ;;
  *) bash "$here/gpu_video.sh" ;;
esac
videos=$?
exit $(( images != 0 ? images : videos ))
