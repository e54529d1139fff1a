"""PPO against TRL 0.19.1's PPOTrainer, side by side in one run: the same SFT policy, reward model, prompts,
batch, response length, LoRA and PPO hyper-parameters (params/ppo.yaml), each side in a fresh process,
interleaved, repeated; episodes/s and peak memory, as ratios.

    make bench-trl-venv            # once: bench/.venv-trl019 from bench/requirements-trl019.txt
    python bench/ppo_bench.py      # after `make demo` (models/sft, models/reward, data/prepared); writes
                                   # bench/RESULTS-ppo.md and bench/results-ppo.json (--out: another name)

Each side is configured as its users would run it on this machine: ours as params/ppo.yaml ships (LoRA
policy and value model, the reward model = the value model with its adapter off, frozen weights in bf16,
gradient checkpointing as the params say; `--no-checkpointing` for the other setting), and a second side of
ours with `value_model: policy_trunk` (a value head on the policy's trunk instead of a value model:
refinery/rlhf/value_head.py); TRL's PPOTrainer with `bf16=True` and a LoRA `peft_config` for the policy (its
value model is always fully trained: TRL's PPO has no adapter for it) and a separately loaded reward model.
What differs besides the code: TRL's KL coefficient is fixed (ours adaptive; the same compute), and each side
samples its own answers, so the generated token counts are reported beside the rates.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_PY = ROOT / "bench" / ".venv-trl019" / "bin" / "python"
GOALS = {"episodes_ratio": 2.0, "memory_ratio": 0.6}  # issue "Fast and lean": >= 2x episodes/s, <= 0.6x memory


def write_spec(path: Path, steps: int, checkpointing: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    from refinery.config import load_params
    from refinery.data.chat import prompt_ids
    from refinery.data.records import read_jsonl
    from refinery.modeling.loading import load_tokenizer
    from refinery.modeling.precision import resolve

    cfg = load_params("ppo", ROOT / "params")
    base = load_params("base", ROOT / "params")
    tok = load_tokenizer(ROOT / "models" / "sft")
    records = [r for _, r in read_jsonl(ROOT / "data/prepared/prompts/train.jsonl")]
    # the prompts flows/ppo.load_inputs keeps (ours reads them itself; TRL's side gets these ids)
    prompts = [ids for r in records if len(ids := prompt_ids(tok, r["prompt"])) <= cfg.max_prompt_tokens]
    settings = {"steps": steps, "batch_size": cfg.batch_size, "mini_batch_size": cfg.mini_batch_size,
                "ppo_epochs": cfg.ppo_epochs, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                "lr": cfg.lr, "kl_coef": cfg.init_kl_coef, "clip_range": cfg.clip_range,
                "clip_range_value": cfg.clip_range_value, "vf_coef": cfg.vf_coef, "gamma": cfg.gamma, "lam": cfg.lam,
                "missing_eos_penalty": cfg.missing_eos_penalty, "lora_r": cfg.lora.r, "lora_alpha": cfg.lora.alpha,
                "lora_targets": list(cfg.lora.target_modules), "gradient_checkpointing": checkpointing,
                "padding_free": cfg.padding_free}
    spec = {"policy": str(ROOT / "models" / "sft"), "reward": str(ROOT / "models" / "reward"), "prompts": prompts,
            "settings": settings, "seed": base.seed, "threads": os.cpu_count() or 1,
            "bf16": resolve(base.precision) == "bf16"}
    path.write_text(json.dumps(spec))
    return spec


VALUE_MODELS = {"ours": "separate", "ours-trunk": "policy_trunk"}  # our sides: params/ppo.yaml `value_model`
DESCRIBED = {"separate": "(the reward model = the value model with its adapter off)",
             "policy_trunk": "(a value head on the policy's trunk; the reward model frozen on its own)"}


def sides(every_n_layers: int) -> dict[str, tuple[str, int | None]]:
    """Our sides: name -> (params/ppo.yaml `value_model`, `checkpoint_every_n_layers` or None for the params'
    own). `--every-n-layers N` adds the shipped trunk side with only every N-th layer recomputed."""
    out: dict[str, tuple[str, int | None]] = {side: (vm, None) for side, vm in VALUE_MODELS.items()}
    if every_n_layers:
        out[f"ours-trunk-every{every_n_layers}"] = ("policy_trunk", every_n_layers)
    return out


def run_ours(spec_path: str, value_model: str, every_n_layers: int | None = None) -> None:
    """Our side, in its own process: the stage's own set-up (flows/ppo.py `load_inputs`, `build_models`,
    `make_trainer`: the models, adapters, judge, frozen bf16 weights and PPOTrainer the stage builds), without
    its evaluation and records. Run from a scratch folder, so its checkpoints never meet the repository's."""
    sys.path.insert(0, str(ROOT))
    import torch

    from flows.ppo import build_models, load_inputs, make_trainer
    from refinery.modeling.precision import compute_precision
    from refinery.ops.host_memory import settle_process

    settle_process()  # as the stage does at its start

    spec = json.loads(Path(spec_path).read_text())
    s = spec["settings"]
    torch.set_num_threads(spec["threads"])
    ends: list[float] = []
    tokens: list[float] = []
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)  # checkpoints/ppo/<hash>/ lands here, not under the repository
        job = load_inputs(str(ROOT / "params"), spec["policy"], spec["reward"], str(ROOT / "data" / "prepared"),
                          {"steps": s["steps"], "save_steps": s["steps"], "value_model": value_model,
                           "gradient_checkpointing": s["gradient_checkpointing"],
                           **({"checkpoint_every_n_layers": every_n_layers} if every_n_layers else {})})
        m = build_models(job)
        with compute_precision(m.precision):
            trainer = make_trainer(job, m, on_step=lambda step, metrics, r: (ends.append(time.perf_counter()),
                                                                             tokens.append(metrics["response_length"])))
            t0 = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t0
        os.chdir(ROOT)
    steps = len(ends)
    steady = (ends[-1] - ends[0]) / (steps - 1) if steps > 1 else None
    print("RESULT " + json.dumps({
        "side": "ours", "steps": steps, "seconds": wall, "episodes_per_second": steps * s["batch_size"] / wall,
        "steady_episodes_per_second": s["batch_size"] / steady if steady else None,
        "mean_response_tokens": sum(tokens) / len(tokens),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "value_model": f"{value_model}, {job.cfg.method} {DESCRIBED[value_model]}",
        "checkpoint_every_n_layers": job.cfg.checkpoint_every_n_layers if job.cfg.gradient_checkpointing else None}))


def one(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"error: {' '.join(cmd[:3])} failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    return json.loads(line[len("RESULT "):])


def summary(runs: list[dict], key: str) -> dict:
    xs = [r[key] for r in runs if r.get(key) is not None]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=6, help="PPO updates per run (default 6)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved runs per side (default 5)")
    ap.add_argument("--no-checkpointing", action="store_true", help="our side without gradient checkpointing")
    ap.add_argument("--every-n-layers", type=int, default=0, metavar="N",
                    help="add a side: value_model policy_trunk with only every N-th layer recomputed")
    ap.add_argument("--out", default=str(ROOT / "bench" / "RESULTS-ppo.md"))
    args = ap.parse_args()
    ours = sides(args.every_n_layers)
    if args.side:
        return run_ours(args.spec, *ours[args.side])
    if not TRL_PY.is_file():
        raise SystemExit(f"error: {TRL_PY} missing: run `make bench-trl-venv` first")
    sys.path.insert(0, str(ROOT))
    from refinery.config import load_params

    spec_path = Path(tempfile.mkdtemp()) / "spec.json"
    checkpointing = load_params("ppo", ROOT / "params").gradient_checkpointing and not args.no_checkpointing
    spec = write_spec(spec_path, args.steps, checkpointing)
    load = os.getloadavg()
    runs: dict[str, list[dict]] = {**{side: [] for side in ours}, "trl": []}
    for i in range(args.repeats):
        for side in ours:
            runs[side].append(one([sys.executable, __file__, "--side", side, "--spec", str(spec_path),
                                   "--every-n-layers", str(args.every_n_layers)]))
        runs["trl"].append(one([str(TRL_PY), str(ROOT / "bench" / "ppo_trl_side.py"), "--spec", str(spec_path)]))
        print(f"repeat {i + 1}/{args.repeats}: " + ", ".join(f"{side} {r[-1]['steady_episodes_per_second']:.3f}"
                                                              for side, r in runs.items()) + " episodes/s (steady)",
              flush=True)
    agg = {side: {k: summary(r, k) for k in ("episodes_per_second", "steady_episodes_per_second", "peak_rss_mb")}
           for side, r in runs.items()}
    ratio = {}
    for side in ours:  # "episodes"/"memory": the default side's, as before; "<key>_<side>" each side's
        for key, metric in (("episodes", "steady_episodes_per_second"), ("memory", "peak_rss_mb")):
            value = agg[side][metric]["median"] / agg["trl"][metric]["median"]
            ratio[key if side == "ours" else f"{key}_{side}"] = value
    result = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_start": load,
              "load_average_end": os.getloadavg(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "settings": spec["settings"], "prompts": len(spec["prompts"]), "bf16": spec["bf16"], "runs": runs,
              "aggregate": agg, "ratio": ratio, "goals": GOALS, "sides": {k: list(v) for k, v in ours.items()}}
    out = Path(args.out)  # RESULTS-ppo.md -> results-ppo.json beside it
    (out.parent / f"{out.stem.lower()}.json").write_text(json.dumps(result, indent=1))
    Path(args.out).write_text(render(result, args))
    print(Path(args.out).read_text())


def render(res: dict, args) -> str:
    import torch
    import transformers

    s, agg, ratio = res["settings"], res["aggregate"], res["ratio"]
    trl_v = res["runs"]["trl"][0]["versions"]
    cell = lambda a: f"{a['median']:.3f} ({a['min']:.3f}-{a['max']:.3f})"  # noqa: E731
    mem = lambda a: f"{a['median']:,.0f} ({a['min']:,.0f}-{a['max']:,.0f})"  # noqa: E731
    met = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    lines = [
        "# PPO: llm-refinery vs TRL 0.19.1's PPOTrainer", "",
        f"Produced by `python bench/ppo_bench.py --steps {args.steps} --repeats {args.repeats}"
        f"{' --no-checkpointing' if args.no_checkpointing else ''}"
        f"{f' --every-n-layers {args.every_n_layers}' if args.every_n_layers else ''}` on {res['when']} "
        "(after `make demo`: its SFT policy and reward model). Each side in a fresh process, the two interleaved; "
        "median (min-max) over the repeats. Ratios are what to compare across machines, not absolute rates.", "",
        "## Machine", "",
        f"- {res['cpus']} CPUs, no GPU; load average at start {', '.join(f'{x:.2f}' for x in res['load_average_start'])}, "
        f"at end {', '.join(f'{x:.2f}' for x in res['load_average_end'])}",
        f"- ours: Python {res['python']}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"TRL side: trl {trl_v['trl']}, transformers {trl_v['transformers']}, torch {trl_v['torch']} "
        "(bench/.venv-trl019, bench/requirements-trl019.txt)", "",
        "## Settings (both sides)", "",
        f"- {res['prompts']} training prompts (data/prepared/prompts/train.jsonl, chat-rendered, <= max_prompt_tokens); "
        f"{s['steps']} PPO updates of {s['batch_size']} episodes, mini-batches of {s['mini_batch_size']}, "
        f"{s['ppo_epochs']} epochs, responses <= {s['max_new_tokens']} tokens at T={s['temperature']}, "
        f"lr {s['lr']}, KL coefficient {s['kl_coef']} (TRL fixed, ours adaptive from it), clip {s['clip_range']}, "
        f"vf_coef {s['vf_coef']}, missing-EOS penalty {s['missing_eos_penalty']}",
        f"- policy: LoRA r={s['lora_r']} alpha={s['lora_alpha']} on {', '.join(s['lora_targets'])}; reference = the "
        "policy with its adapter off (both sides)",
        f"- precision: {'bf16 autocast (ours: precision auto; TRL: bf16=True)' if res['bf16'] else 'fp32'}; "
        f"ours: gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, TRL: off (its default); "
        f"ours: padding-free scoring and update forwards `{s.get('padding_free', False)}` (auto: on a CPU), TRL: "
        "left-padded batches (its only layout)",
        *(f"- value model, {side}: {res['runs'][side][0]['value_model']}"
          + (f"; only every {n}th layer recomputed (checkpoint_every_n_layers {n})" if n else "")
          for side, (_, n) in res["sides"].items()),
        f"- value model, trl: {res['runs']['trl'][0]['value_model']}, and a separately loaded reward model",
        "- episodes/s *steady* = batch size / mean seconds per update from the end of update 1 to the end of the last "
        "(no model loading, no warm-up update; ours also leaves out its final checkpoint save); peak memory = "
        "the process's peak RSS (ru_maxrss: loading and training)", "",
        "## Results", "",
        "| side | steady episodes/s | episodes/s (whole train()) | peak RSS MB |", "|---|---:|---:|---:|",
        *(f"| {side} | {cell(a['steady_episodes_per_second'])} | {cell(a['episodes_per_second'])} | "
          f"{mem(a['peak_rss_mb'])} |" for side, a in agg.items()), "",
        *ratio_lines(ratio, met, res["sides"]),
        *(f"- mean response length, {side}: "
          f"{statistics.mean(r['mean_response_tokens'] for r in res['runs'][side]):.1f} tokens"
          for side in res["sides"] if side in res["runs"]),
        "- TRL does not report its response length; both sides stop at EOS or the limit", ""]
    return "\n".join(lines)


def ratio_lines(ratio: dict, met, our_sides: dict) -> list[str]:
    out = []
    for side, (value_model, _) in our_sides.items():
        suffix = "" if side == "ours" else f"_{side}"
        if f"episodes{suffix}" not in ratio:
            continue
        episodes, memory = ratio[f"episodes{suffix}"], ratio[f"memory{suffix}"]
        out += [f"- episodes/s, {side} (value_model: {value_model}) / TRL: **{episodes:.2f}x** "
                f"(goal >= {GOALS['episodes_ratio']}x: {met(episodes >= GOALS['episodes_ratio'])})",
                f"- peak memory, {side} (value_model: {value_model}) / TRL: **{memory:.2f}x** "
                f"(goal <= {GOALS['memory_ratio']}x: {met(memory <= GOALS['memory_ratio'])})"]
    return out


if __name__ == "__main__":
    main()
