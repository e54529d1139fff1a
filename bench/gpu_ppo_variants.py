#!/usr/bin/env python
"""One variant of gpu_bench.py's PPO case at 1B, in its own process (a CUDA device-side assert ends a process, so
each variant gets one). Written after the main GPU run's PPO drew NaN sampling probabilities at step 4 under
cuDNN's SDPA backend; these runs located it and gave the PPO numbers in RESULTS-gpu.md section 3.

    PYTHONPATH=.gpusnap:/tmp/site python3 bench/gpu_ppo_variants.py VARIANT OUT.json   # on the GPU
    python bench/gpu_bench.py --report results-gpu.json --ppo-runs OUT1.json OUT2.json ...

VARIANT: `nocudnn` (bf16 = the stage's `auto`, cuDNN's SDPA backend off process-wide), `eager` (bf16, eager
attention), `fp32-nocudnn` (fp32, for the memory the 16-bit frozen weights save), `default` (bf16, every SDPA
backend allowed).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    variant, out = sys.argv[1], Path(sys.argv[2]).resolve()
    sys.argv = sys.argv[:1]
    spec = importlib.util.spec_from_file_location("gpu_bench", HERE / "gpu_bench.py")
    G = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(G)
    import torch

    src = (HERE.parent / ".gpusnap").resolve()
    os.chdir(src)  # params/ is read relative to the working directory, as gpu_bench.run does
    ctx = G.Ctx(types.SimpleNamespace(tiny=False, src=str(src), timed=2, no_liger=True))
    if "nocudnn" in variant:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if variant == "eager":
        build = G.build_model

        def eager(ctx, kind):
            model = build(ctx, kind)
            model.set_attn_implementation("eager")
            return model

        G.build_model = eager
    t0 = time.time()
    try:
        r = G.case_ppo(ctx, "fp32" if variant.startswith("fp32") else "auto")
    except Exception as exc:  # noqa: BLE001 - recorded
        r = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    r.update(variant=variant, wall=round(time.time() - t0, 1),
             command="python3 bench/gpu_ppo_variants.py " + variant, machine=G.machine(ctx))
    out.write_text(json.dumps(r, indent=1, default=str) + "\n")
    print("DIAG", json.dumps({k: r.get(k) for k in ("variant", "error", "steps", "peak_gpu_mb", "wall")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
