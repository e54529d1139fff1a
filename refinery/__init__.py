"""llm-refinery's library: everything the Prefect flows in `flows/` call.

    data/        records and their validation, prepare, chat rendering, packing, the SFT mixture
    modeling/    base import, loading and saving stage models, the method registry, bottleneck adapters
    train/       the Trainer loop of dapt/sft/reward, the reward model, the start/save every stage shares
    rlhf/        PPO: maths, rollouts, the loop, the policy evaluation
    evaluation/  held-out loss and generation, SFT task scores, text metrics
    ops/         CLI, Prefect links and artifacts, DVC graph, distributed launch, MLflow record, registry,
                 manifests, serving several adapters
"""
