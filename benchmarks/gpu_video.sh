#!/usr/bin/env bash
# The video part of the GPU check: random-weight Video-LLaVA-7B (8 frames x 257 tokens) and
# LLaVA-OneVision-7B (8 shapes-video frames x 196 tokens) in bf16, the video methods at 25% and 12.5%
# (DyCoke with its decode stage), under SDPA and flash_attention_2 (when flash-attn is installed),
# through `tokenbench run`'s efficiency pass (CUDA events). Results go under $OUT (default
# gpu-video-results), one folder per model and backend; the tables are printed.
# Exit status: 0 every run finished, 1 a run failed, 2 no CUDA here.
#   benchmarks/gpu_video.sh               # on a CUDA machine
#   benchmarks/gpu_video.sh --dry-run     # a tiny Video-LLaVA config on the CPU: checks the code path
set -uo pipefail
py="${PYTHON:-python}"
out="${OUT:-gpu-video-results}"
methods="apet,holitom,dycoke,fastv,dart,random"
if [ "${1:-}" = "--dry-run" ]; then
  mkdir -p "$out"
  "$py" - "$out/tiny-video-llava.json" <<'PY' || exit 1
import json, sys
from tokenbench.random_model import config_path
config = json.loads(config_path("video-llava-7b").read_text())
config["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                             num_key_value_heads=4)
config["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
open(sys.argv[1], "w").write(json.dumps(config))
PY
  runs=("$out/tiny-video-llava.json:cpu:float32:sdpa")
  methods="apet,dycoke"
  limit=2
else
  if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_video: CUDA is not available on this machine; check the script with --dry-run" >&2
    exit 2
  fi
  attns=(sdpa)
  if "$py" -c "import flash_attn" 2>/dev/null; then attns+=(flash_attention_2)
  else echo "flash_attention_2: not run (needs the flash-attn package)"; fi
  runs=()
  for config in video-llava-7b llava-onevision-7b; do
    for attn in "${attns[@]}"; do runs+=("$config:cuda:bfloat16:$attn"); done
  done
  limit=8
fi
status=0
for run in "${runs[@]}"; do
  IFS=: read -r config device dtype attn <<<"$run"
  echo "== $(basename "$config" .json) $attn"
  "$py" -m tokenbench run --model-config "$config" --tasks shapes-video --methods "$methods" \
    --budgets 25%,12.5% --limit "$limit" --device "$device" --dtype "$dtype" --attn "$attn" \
    --output "$out/$(basename "$config" .json)-$attn" || status=1
done
exit $status
