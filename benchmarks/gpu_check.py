"""The GPU check: TTFT speed-up against the FLOPs bound at LLaVA-1.5-7B / Qwen2-VL-2B scale.

For each ``--model-config`` (random weights in ``--dtype``, bf16 by default) and each attention
backend (SDPA forced onto its FlashAttention kernel; ``flash_attention_2`` when flash-attn is
installed), it runs ``none`` and every built-in method at every budget, batch 1, one 576-token image
and a 60-word question, interleaved over ``--rounds`` rounds after a warm-up round (``sweep.py``),
timed with CUDA events. Per arm it prints the median TTFT, the paired TTFT speed-up over ``none``
with its min..max, the FLOPs bound, their ratio, the share of TTFT spent in the method's ``reduce``
(ApET's selection time), the KV-cache bytes and the peak memory of one extra run.

Exit status: 0 when every arm ran (an ``Infeasible`` budget is reported, not a failure), 1 when an
arm crashed, 2 without CUDA (or on bad arguments). ``--device cpu --dry-run`` runs the same code path
on tiny widths of the same configs, in seconds, to check the script where no GPU is lent.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from sweep import QUESTION, Prompt, arms, build_adapter, builtin_methods, image_for, summarise, sweep, table

from tokenbench.measure import flash_attn_available
from tokenbench.plugins import load_registry

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TINY = {  # --dry-run: tiny widths (same families, image sizes, token counts; 16 layers so every budget fits)
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 16, "num_attention_heads": 4,
             "num_key_value_heads": 2},
    "llava": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 6, "num_attention_heads": 2},
    "qwen2_vl": {"depth": 2, "embed_dim": 32, "num_heads": 2, "hidden_size": 64},
}


def backends(device: torch.device) -> list[tuple[str, str, Callable[[], AbstractContextManager]]]:
    """(label, attn_implementation, context) for each backend to run; flash_attention_2 needs CUDA and
    flash-attn."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = [("sdpa:flash", "sdpa", lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION))]
    if device.type == "cuda" and flash_attn_available():
        out.append(("flash_attention_2", "flash_attention_2", nullcontext))
    else:
        print("flash_attention_2: not run (needs CUDA and the flash-attn package)", flush=True)
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", action="append", dest="configs",
                        help="shipped config name or config.json (repeatable; default llava-1.5-7b and qwen2-vl-2b)")
    parser.add_argument("--methods", default="all", help="comma-separated, or 'all' built-in methods")
    parser.add_argument("--budgets", default="576,192,128,64", help="576 is the uncompressed baseline")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--dry-run", action="store_true", help="tiny widths: check the code path in seconds")
    parser.add_argument("--json", type=Path, help="write every table's rows to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine; run it where a GPU is, or check the "
              "script with --device cpu --dry-run", file=sys.stderr)
        return 2
    registry = load_registry()
    methods = builtin_methods(registry) if args.methods == "all" else args.methods.split(",")
    unknown = sorted(set(methods) - set(registry.table("compressor")))
    if unknown:
        print(f"gpu_check: unknown method(s) {', '.join(unknown)}; known: "
              f"{', '.join(sorted(registry.table('compressor')))}", file=sys.stderr)
        return 2
    budgets = [b for b in args.budgets.split(",") if b != "576"]
    rounds = 1 if args.dry_run else args.rounds
    plan = arms(methods, budgets)
    crashed, report = [], {}
    for config in args.configs or ["llava-1.5-7b", "qwen2-vl-2b"]:
        for label, attn, kernel in backends(device):
            title = f"{config} ({'tiny widths, ' if args.dry_run else ''}random weights, {args.dtype}, {label})"
            print(f"\n== {title}", flush=True)
            try:
                adapter = _adapter(config, registry, DTYPES[args.dtype], device, attn, args.dry_run)
            except Exception as exc:  # noqa: BLE001 -- one backend failing to load is a crash to report
                crashed.append(f"{title}: load: {type(exc).__name__}: {exc}")
                print(f"CRASHED loading: {type(exc).__name__}: {exc}", flush=True)
                continue
            prompt = Prompt(image_for(adapter), QUESTION)
            results = sweep(adapter, registry, plan, prompt, rounds=rounds, kernel=kernel, memory=True,
                            log=lambda line: print(line, flush=True))
            rows = summarise(results, "ttft")
            print(table(rows, "ttft"), flush=True)
            crashed += [f"{title}: {row['arm']}: {row['error']}" for row in rows if row["error"]]
            report[title] = rows
            del adapter, results
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if crashed:
        print("\ncrashed arms:\n  " + "\n  ".join(crashed), file=sys.stderr)
        return 1
    print("\nevery arm ran", flush=True)
    return 0


def _adapter(config: str, registry, dtype: torch.dtype, device: torch.device, attn: str, tiny: bool):
    if not tiny:
        return build_adapter(config, registry, dtype=dtype, device=device, attn=attn)
    family = "qwen2_vl" if "qwen" in config else "llava"
    text = TINY["text"] | ({"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
                           if family == "qwen2_vl" else {})
    return build_adapter(config, registry, dtype=dtype, device=device, attn=attn, text=text, vision=TINY[family])


if __name__ == "__main__":
    sys.exit(main())
