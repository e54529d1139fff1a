"""Typed, validated params: every `params/<stage>.yaml` becomes a pydantic object.

An unknown key, a wrong type or an unknown method is a one-line `UserError` naming the file and the key.
DVC tracks the same files (`params:` in dvc.yaml), so what DVC hashes is what the stage reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from refinery.errors import UserError
from refinery.modeling.method_specs import METHOD_NAMES

METHODS = METHOD_NAMES  # one list: refinery/modeling/method_specs.py
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---- adaptation methods: one block each, sensible defaults -------------------------------------
class LoraArgs(Strict):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_LINEAR))
    use_dora: bool = False    # DoRA (peft): a learned magnitude per output channel beside the low-rank direction
    use_rslora: bool = False  # rank-stabilised LoRA (peft): scale alpha/sqrt(r) instead of alpha/r
    # peft's init_lora_weights: default (B = 0, A Kaiming) | gaussian | pissa (A, B from the weight's top
    # singular vectors; the frozen weight keeps the residual) | olora (from a QR decomposition). pissa/olora
    # change the frozen weight, so the saved adapter is converted back to a plain LoRA delta on the untouched
    # base (peft's path_initial_model_for_weight_conversion) and PPO, whose reference is the adapter switched
    # off, refuses them
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"

    @model_validator(mode="after")
    def _init_combinations(self):
        if self.init in ("pissa", "olora") and self.use_dora:
            raise ValueError(f"init: {self.init} with use_dora: true is not supported (pick one)")
        return self


class QLoraArgs(LoraArgs):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True

    @model_validator(mode="after")
    def _no_mutating_init(self):
        if self.init in ("pissa", "olora"):  # the 4-bit base cannot hold the residual weight exactly
            raise ValueError(f"init: {self.init} is not supported with qlora (use method: lora)")
        return self


class AdapterArgs(Strict):
    """Bottleneck adapters (Houlsby: after attention and MLP; Pfeiffer: after the MLP only)."""

    bottleneck: int = Field(32, gt=0)
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    nonlinearity: Literal["relu", "gelu", "silu"] = "relu"
    dropout: float = Field(0.0, ge=0, lt=1)


class IA3Args(Strict):
    target_modules: list[str] = Field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: list[str] = Field(default_factory=lambda: ["down_proj"])


class PrefixArgs(Strict):
    num_virtual_tokens: int = Field(16, gt=0)
    encoder_hidden_size: int = Field(128, gt=0)


class PromptArgs(Strict):
    num_virtual_tokens: int = Field(16, gt=0)
    init_text: str | None = None  # None: random init; else initialise from these tokens


class PtuningArgs(Strict):
    num_virtual_tokens: int = Field(16, gt=0)
    encoder_hidden_size: int = Field(128, gt=0)
    encoder_type: Literal["MLP", "LSTM"] = "MLP"


class PtuningV2Args(Strict):
    num_virtual_tokens: int = Field(16, gt=0)


class MethodParams(Strict):
    method: str = "lora"
    lora: LoraArgs = Field(default_factory=LoraArgs)
    qlora: QLoraArgs = Field(default_factory=QLoraArgs)
    adapter: AdapterArgs = Field(default_factory=AdapterArgs)
    ia3: IA3Args = Field(default_factory=IA3Args)
    prefix: PrefixArgs = Field(default_factory=PrefixArgs)
    prompt: PromptArgs = Field(default_factory=PromptArgs)
    ptuning: PtuningArgs = Field(default_factory=PtuningArgs)
    ptuning_v2: PtuningV2Args = Field(default_factory=PtuningV2Args)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method '{value}' (known: {', '.join(METHODS)})")
        return value

    @property
    def method_args(self) -> Strict | None:
        return None if self.method == "full" else getattr(self, self.method)


class TrainingArgs(Strict):
    max_steps: int = Field(20, gt=0)
    # passes over the training data instead of a step count: when set, max_steps is derived from it (refinery/
    # train/trainer.py `derive_max_steps`) and the stage prints what it derived; null: max_steps as given
    num_epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    save_steps: int = Field(10, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    # validation-loss monitoring: every `eval_steps` steps the loss on a fixed validation slice is logged and
    # the best checkpoint (lowest loss) becomes the stage's output; 0 turns it off (the last step is kept)
    eval_steps: int = Field(0, ge=0)
    early_stopping_patience: int = Field(0, ge=0)  # stop after N evaluations without improvement; 0: never
    # resolved from params/base.yaml `precision` by load_params (refinery/modeling/precision.py): one knob for
    # every stage, so a stage file may not set it
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    # with gradient_checkpointing: recompute only every n-th decoder layer (transformers' `every_n_layers`); the
    # others keep their activations. The same numbers either way, a trade between the two ends' memory and time
    checkpoint_every_n_layers: int = Field(1, ge=1)
    # kernels, both passed to transformers' Trainer: `torch_compile` compiles the model (the first steps pay
    # the compilation); `use_liger_kernel` swaps in Liger's Triton kernels (RMSNorm, RoPE, SwiGLU and the fused
    # linear cross-entropy, which never materialises the [tokens x 49k] logits): CUDA only, `pip install
    # liger-kernel` (the `gpu` extra), refused in one line elsewhere
    torch_compile: bool = False
    use_liger_kernel: bool = False
    # Processes for this stage (refinery/ops/distributed.py): >1 relaunches it under torchrun (DDP: gloo on CPU, nccl
    # on GPU); `accelerate_config` (e.g. configs/accelerate/fsdp.yaml) relaunches it with `accelerate launch`.
    # batch_size stays per process: the global batch is batch_size x grad_accum x processes.
    nproc_per_node: int = Field(1, gt=0)
    accelerate_config: str | None = None


class EvalArgs(Strict):
    max_batches: int = Field(8, gt=0)
    batch_size: int = Field(4, gt=0)
    num_samples: int = Field(3, ge=0)  # sample generations logged as an artifact
    max_new_tokens: int = Field(48, gt=0)


# ---- stages --------------------------------------------------------------------------------------
class TrackingParams(Strict):
    experiment: str = "llm-refinery"
    on_server_unreachable: Literal["error", "local"] = "error"


class BaseParams(Strict):
    seed: int = 42
    # auto | fp32 | bf16 | fp16: fp32 master weights, matmuls at this precision (refinery/modeling/precision.py)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # attention kernel of every model a stage loads (transformers' `attn_implementation`); null: transformers'
    # default (sdpa where the architecture has it). flash_attention_2 needs CUDA and the flash-attn package;
    # segment_sdpa: sdpa, with padding-free rows attended one sequence at a time (refinery/modeling/attention.py)
    attn_implementation: Literal["sdpa", "segment_sdpa", "eager", "flash_attention_2", "flex_attention"] | None = None
    trust_remote_code: bool = False
    tracking: TrackingParams = Field(default_factory=TrackingParams)


class TinyArgs(Strict):
    layers: int = Field(2, gt=0)
    hidden: int = Field(64, gt=0)
    heads: int = Field(4, gt=0)
    kv_heads: int = Field(2, gt=0)
    intermediate: int = Field(128, gt=0)
    max_positions: int = Field(2048, gt=0)


class BaseModelParams(Strict):
    source: Literal["smollm2", "tiny", "local", "hub"] = "smollm2"
    path: str | None = None  # folder for `local`, model id for `hub`
    # hub only: the branch, tag or commit to load; the commit it resolved to is recorded in models/base's
    # manifest (an out in dvc.lock), so a moving branch shows up as a changed base model
    revision: str | None = None
    tiny: TinyArgs = Field(default_factory=TinyArgs)

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source in ("local", "hub") and not self.path:
            raise ValueError(f"source '{self.source}' needs 'path'")
        return self


class DataSourceParams(Strict):
    """A data set given in full; a plain string is the same as `{path: <string>}`. Formats and file types:
    refinery/data/formats.py."""
    path: str  # .jsonl/.json/.parquet/.csv file, a save_to_disk folder, or a hub dataset name
    format: str = "auto"  # auto: detected from the columns; or one of formats.FORMATS[<kind>]
    revision: str | None = None  # hub datasets: the commit or tag to load (recorded in the prepare report)
    split: str = "train"  # hub datasets and save_to_disk folders holding several splits


DataSource = str | DataSourceParams


class DatasetsParams(Strict):
    corpus: DataSource
    sft: dict[str, DataSource]  # task name -> data set
    preferences: DataSource
    prompts: DataSource
    # general-domain held-out text (`text` per record), never trained on: dapt, sft and ppo measure its
    # perplexity before and after (retention, catastrophic forgetting). null: not measured
    general: DataSource | None = None

    def sources(self) -> dict[str, tuple[DataSource, str]]:
        """Prepared set name -> (source, record kind), in the order prepare writes them."""
        out: dict[str, tuple[DataSource, str]] = {"corpus": (self.corpus, "corpus"),
                                                  "preferences": (self.preferences, "preferences"),
                                                  "prompts": (self.prompts, "prompts")}
        out.update({f"sft/{task}": (src, "sft") for task, src in self.sft.items()})
        if self.general is not None:  # held out whole: it is only ever evaluated on
            out["general"] = (self.general, "corpus")
        return out


class PrepareParams(Strict):
    on_bad_record: Literal["error", "skip"] = "error"
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    # every data set holds out at least this many records (capped at half of it), so each held-out
    # comparison has the n it needs (refinery/evaluation/stats.py); 0: the fraction alone decides
    min_validation: int = Field(0, ge=0)
    max_length: int = Field(1024, gt=0)  # tokens; records longer than this (or the model context) are bad
    datasets: DatasetsParams


class DaptParams(MethodParams):
    block_size: int = Field(256, gt=8)
    # join a batch's packed rows into one row instead of padding the shorter ones (refinery/data/packing.py
    # FlatCollator): for a varlen attention kernel (flash_attention_2); packing methods only
    padding_free: bool = False
    training: TrainingArgs = Field(default_factory=TrainingArgs)
    eval: EvalArgs = Field(default_factory=EvalArgs)


class SftTask(Strict):
    weight: float = Field(1.0, gt=0)
    metric: Literal["exact_match", "token_f1", "rouge_l"] = "rouge_l"
    # generation length of this task's held-out answers (a module name is 3 tokens, an explanation 60);
    # null: eval.max_new_tokens
    max_new_tokens: int | None = Field(None, gt=0)


class SftEvalArgs(Strict):
    before: bool = True  # also evaluate the input model (the method comparison evaluates it once, not per method)
    max_examples_per_task: int = Field(16, gt=0)
    batch_size: int = Field(8, gt=0)             # rows per forward of the held-out loss
    generate_batch_size: int = Field(16, gt=0)   # prompts per greedy generation batch (length-sorted)
    max_new_tokens: int = Field(48, gt=0)


class SftParams(MethodParams):
    """Multi-task SFT. Mixing: `proportional` samples task i with p_i ∝ weight_i·n_i (n_i = its training
    examples); `temperature` uses p_i ∝ (weight_i·n_i)^(1/temperature), flattening the mixture as T grows."""

    tasks: dict[str, SftTask]
    mixing: Literal["proportional", "temperature"] = "proportional"
    temperature: float = Field(2.0, gt=0)
    block_size: int = Field(512, gt=8)  # packed row length (tokens)
    padding_free: bool = False  # as DaptParams.padding_free
    # multi-turn conversations: learn every assistant turn, or only the final answer (the one evaluated)
    loss_on: Literal["all_turns", "last_turn"] = "all_turns"
    training: TrainingArgs = Field(default_factory=TrainingArgs)
    eval: SftEvalArgs = Field(default_factory=SftEvalArgs)

    @model_validator(mode="after")
    def _some_task(self):
        if not self.tasks:
            raise ValueError("at least one task is needed")
        return self


class RewardEvalArgs(Strict):
    max_pairs: int = Field(64, gt=0)
    batch_size: int = Field(8, gt=0)
    buckets: int = Field(4, gt=0)  # calibration: accuracy by |margin| quantile bucket


class RewardParams(MethodParams):
    """Reward model: a scalar head on the SFT model, Bradley-Terry loss -log σ(r_chosen - r_rejected - margin)."""

    margin: float = Field(0.0, ge=0)
    max_length: int = Field(512, gt=8)
    # training pairs of a task (its `task` field) are seen this many times as often as the others (oversampled
    # by repetition; 1.0 = as many as the data has): a task whose pairs are short and hard gets more passes
    task_weights: dict[str, float] = Field(default_factory=dict)
    # a batch's chosen and rejected sequences joined into one row instead of padded to the longest
    # (refinery/train/reward_model.py FlatPairCollator); auto: on where it was measured to pay (a CPU, or
    # attn_implementation flash_attention_2), off on a GPU under sdpa/eager (reward_model.padding_free_on)
    padding_free: bool | Literal["auto"] = "auto"
    # each pair's prompt computed once: joined pairs under segment_sdpa, the rejected answer a branch attending to
    # the shared prompt (reward_model.FlatPairCollator, pair_attention); the same loss and gradients, a demo step
    # ~2x faster on a CPU. Off by default: its bf16 rounding redraws the demo (README "Padding-free pairs")
    share_prompts: bool = False
    training: TrainingArgs = Field(default_factory=TrainingArgs)
    eval: RewardEvalArgs = Field(default_factory=RewardEvalArgs)

    @field_validator("task_weights")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [t for t, w in v.items() if not w > 0]
        if bad:
            raise ValueError(f"task_weights.{bad[0]}: must be > 0")
        return v


DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")  # TRL 1.16's DPOConfig


class PolicyEvalArgs(Strict):
    """How an aligned policy is judged against its SFT policy on held-out prompts (refinery/rlhf/policy_eval.py):
    the same fields, with the same defaults, for every alignment stage, so their numbers compare."""

    eval_prompts: int = Field(24, gt=0)
    eval_max_new_tokens: int = Field(32, gt=0)
    eval_samples: int = Field(4, ge=0)       # sampled answers per prompt and policy for the win rate (0: greedy)
    temperature: float = Field(1.0, gt=0)    # sampling (PPO: also its rollouts)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    # agreement of greedy answers with the held-out references, per prompt task (default rouge_l)
    reference_metrics: dict[str, Literal["exact_match", "token_f1", "rouge_l"]] = Field(
        default_factory=lambda: {"which_module": "exact_match", "summarize": "rouge_l"})


class TrlReferenceParams(MethodParams):
    """A stage trained by a TRL trainer whose reference is the SFT policy as the policy with its adapter off (dpo,
    grpo): an adapter init that changes the frozen weights (pissa, olora) would make that reference another model."""

    _reference_of: ClassVar[str] = ""  # the stage's name in the refusal

    @model_validator(mode="after")
    def _reference_is_the_adapter_off(self):
        if self.method in ("lora", "qlora") and getattr(self.method_args, "init", "default") in ("pissa", "olora"):
            raise ValueError(f"{self.method}.init: {self.method_args.init} changes the frozen weights, and "
                             f"{self._reference_of}'s reference is the policy with its adapter off (use default or "
                             "gaussian)")
        return self


class DPOParams(TrlReferenceParams):
    """Direct preference optimisation (Rafailov et al. 2023) from the SFT policy on the preference pairs, on TRL's
    DPOTrainer; the reference is the SFT policy (for LoRA: the same weights with the adapter off)."""

    _reference_of: ClassVar[str] = "DPO"

    beta: float = Field(0.1, gt=0)           # strength of the implicit KL to the reference
    loss_type: Literal[DPO_LOSSES] = "sigmoid"  # sigmoid = DPO, ipo = IPO, hinge = SLiC, ...
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # conservative DPO / robust: assumed share of flipped labels
    max_length: int = Field(512, gt=8)       # prompt + answer tokens; longer pairs keep their start
    training: TrainingArgs = Field(default_factory=TrainingArgs)
    eval: PolicyEvalArgs = Field(default_factory=PolicyEvalArgs)


PROMPT_SOURCES = ("prompts", "preferences")  # ppo/grpo training prompts: refinery/data/prompt_sources.py


class PPOParams(MethodParams, PolicyEvalArgs):
    """PPO with a KL penalty to the SFT reference (InstructGPT / Ziegler et al. 2019). Its evaluation fields
    (eval_prompts ... reference_metrics) and its sampling (temperature, top_k, top_p: rollouts and the sampled win
    rate alike) are PolicyEvalArgs', which dpo keeps under `eval`."""

    steps: int = Field(12, gt=0)
    batch_size: int = Field(8, gt=0)          # prompts (= episodes) per PPO step
    mini_batch_size: int = Field(4, gt=0)
    ppo_epochs: int = Field(2, gt=0)
    lr: float = Field(1e-4, gt=0)
    value_lr: float = Field(1e-4, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    max_prompt_tokens: int = Field(256, gt=0)  # longer training prompts are left out (rollout cost ~ length)
    # prepared splits the training prompts come from (refinery/data/prompt_sources.py): prompts | preferences
    prompt_sources: list[Literal[PROMPT_SOURCES]] = Field(default_factory=lambda: ["prompts"], min_length=1)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    kl_controller: Literal["adaptive", "fixed"] = "adaptive"
    init_kl_coef: float = Field(0.05, ge=0)
    target_kl: float = Field(1.0, gt=0)      # per-sequence KL the adaptive controller steers towards
    kl_horizon: int = Field(100, gt=0)
    kl_estimator: Literal["k1", "k2", "k3", "abs"] = "k1"
    whiten_rewards: bool = False
    reward_clip: float | None = Field(5.0, gt=0)
    normalize_scores: bool = True            # scores and values through one (x - mean) / std, fixed at step 1
    missing_eos_penalty: float | None = Field(1.0, ge=0)  # subtracted from the score of a response without EOS
    save_steps: int = Field(4, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    sample_every: int = Field(4, gt=0)       # log a prompt/response/reward table every N steps
    gradient_checkpointing: bool = False     # policy and value model recompute activations in the backward pass
    checkpoint_every_n_layers: int = Field(1, ge=1)  # ... only every n-th decoder layer (the rest keep theirs)
    # where the values come from (refinery/rlhf/value_head.py): `separate` = a value model of its own, initialised
    # from the reward model (InstructGPT); `policy_trunk` = a linear head on the policy's last hidden state (one
    # forward gives log-probs and values; the value loss also trains the policy's adapter, weighted by vf_coef)
    value_model: Literal["separate", "policy_trunk"] = "separate"
    # scoring and update forwards on each rollout row's real tokens joined into one row (refinery/rlhf/rollout.py
    # flat_inputs) instead of the left-padded batch; auto as the reward stage's (reward_model.padding_free_on)
    padding_free: bool | Literal["auto"] = "auto"
    # data-parallel PPO under torchrun (refinery/rlhf/ppo_distributed.py): each process samples and scores
    # batch_size / nproc_per_node episodes a step; mini-batches are split the same way
    nproc_per_node: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _minibatch(self):
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of mini_batch_size {self.mini_batch_size}")
        if self.mini_batch_size % self.nproc_per_node:
            raise ValueError(f"mini_batch_size {self.mini_batch_size} is not a multiple of nproc_per_node "
                             f"{self.nproc_per_node} (each process takes an equal share of every mini-batch)")
        return self

    @model_validator(mode="after")
    def _reference_is_the_adapter_off(self):
        if self.method == "lora" and self.lora.init in ("pissa", "olora"):
            raise ValueError(f"lora.init: {self.lora.init} changes the frozen weights, and PPO's reference is the policy "
                             "with its adapter off, which would then not be the SFT model (use default or gaussian)")
        return self


GRPO_LOSSES = ("grpo", "dapo", "dr_grpo", "bnpo")  # TRL 1.16's GRPOConfig.loss_type values this stage accepts


class GRPOParams(TrlReferenceParams):
    """GRPO (Shao et al. 2024, DeepSeekMath) from the SFT policy on the prompts, on TRL's GRPOTrainer: a group of
    `num_generations` sampled answers per prompt, each scored by models/reward as ppo scores its rollouts, the
    advantage an answer's score against its group's (no value model); `beta` weighs the KL to the SFT policy
    (for LoRA: the adapter off). `training.batch_size` counts prompts per step (TRL's per-device batch of
    completions is batch_size x num_generations)."""

    _reference_of: ClassVar[str] = "GRPO"

    num_generations: int = Field(4, ge=2)     # group size: answers sampled per prompt
    max_new_tokens: int = Field(20, gt=0)     # completion length (TRL's max_completion_length)
    max_prompt_tokens: int = Field(128, gt=0)  # longer training prompts are left out (as ppo does)
    prompt_sources: list[Literal[PROMPT_SOURCES]] = Field(default_factory=lambda: ["prompts"], min_length=1)  # as ppo's
    temperature: float = Field(0.7, gt=0)     # sampling of the group (ppo's rollout temperature)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    beta: float = Field(0.04, ge=0)           # KL to the reference (0: TRL then loads no reference at all)
    epsilon: float = Field(0.2, gt=0)         # PPO-style ratio clip
    loss_type: Literal[GRPO_LOSSES] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"  # divide advantages by the group's / batch's std
    num_iterations: int = Field(1, gt=0)      # policy updates per generated batch (TRL's mu)
    missing_eos_penalty: float | None = Field(1.0, ge=0)  # subtracted from the score of an answer without EOS
    training: TrainingArgs = Field(default_factory=TrainingArgs)
    eval: PolicyEvalArgs = Field(default_factory=PolicyEvalArgs)

    @model_validator(mode="after")
    def _no_validation_loss(self):
        # GRPO has no validation loss (TRL's eval would sample and score held-out prompts, an evaluation of its own):
        # the policy is judged after training (policy_eval), and the last step is the output
        if self.training.eval_steps or self.training.early_stopping_patience:
            raise ValueError("training.eval_steps / early_stopping_patience: GRPO has no validation loss to monitor "
                             "(the policy is judged on held-out prompts after training); set both to 0")
        return self


ALIGNMENT_STAGES = ("ppo", "dpo", "grpo")  # the alignment stages params/pipeline.yaml may select


class PipelineParams(Strict):
    """Which alignment stages the pipeline runs after sft and reward (refinery/ops/dvc_deps.py writes their dvc.yaml
    blocks and the report's deps from this list, so `dvc repro` runs the same set). Each is judged against the SFT
    policy on the same held-out prompts; the report compares them and the registry's champion is chosen across
    them."""

    alignment: list[Literal[ALIGNMENT_STAGES]] = Field(default_factory=lambda: ["ppo"], min_length=1)

    @model_validator(mode="after")
    def _unique(self):
        if len(set(self.alignment)) != len(self.alignment):
            raise ValueError(f"alignment: {self.alignment} names a stage twice")
        return self


class CompareParams(Strict):
    """The method comparison (flows/compare_methods.py, `make compare`): the same SFT, once per method and seed."""

    methods: list[str] = Field(default_factory=lambda: ["full", "lora", "adapter", "ia3", "prefix", "prompt",
                                                        "ptuning", "ptuning_v2"])
    # base.yaml's `seed` per run; the table's verdicts are checked for stability across them
    seeds: list[int] = Field(default_factory=lambda: [42, 43], min_length=1)
    max_steps: int = Field(24, gt=0)
    parallel: int = Field(1, gt=0)  # concurrent methods (each its own process); 1 on a small CPU machine
    task_runner: Literal["thread", "dask"] = "thread"  # dask: prefect-dask's local cluster (or DASK_SCHEDULER_ADDRESS)
    lr: dict[str, float] = Field(default_factory=dict)  # per-method learning rate overrides
    sft_overrides: dict[str, Any] = Field(default_factory=dict)  # dotted params/sft.yaml keys, for every method

    @model_validator(mode="after")
    def _known(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method '{bad[0]}' (known: {', '.join(METHODS)})")
        for name, values in (("methods", self.methods), ("seeds", self.seeds)):
            if len(set(values)) < len(values):
                raise ValueError(f"{name}: {values} lists a value twice")
        return self


class RegistryArgs(Strict):
    """Model registry: the PPO policy is registered as a new version; alias `champion` moves to it only when
    the 95% CI of its RM-judged win rate over its SFT policy lies above `min_win_rate`, and it is not
    significantly worse than the champion (win rate; reference agreement by more than `max_reference_drop`);
    otherwise `challenger` (refinery/ops/registry.py `decide`)."""

    enabled: bool = True
    model_name: str = "llm-refinery-policy"
    min_win_rate: float = Field(0.5, ge=0, le=1)
    max_reference_drop: float = Field(0.02, ge=0)
    # a policy whose agreement with the reference answers fell significantly below its SFT policy's is reward
    # over-optimisation, whatever the reward model thinks of it: challenger
    reference_must_hold: bool = True


class ReportParams(Strict):
    registry: RegistryArgs = Field(default_factory=RegistryArgs)


STAGE_MODELS: dict[str, type[Strict]] = {
    "base": BaseParams,
    "base_model": BaseModelParams,
    "prepare": PrepareParams,
    "dapt": DaptParams,
    "sft": SftParams,
    "compare": CompareParams,
    "dpo": DPOParams,
    "grpo": GRPOParams,
    "pipeline": PipelineParams,
    "reward": RewardParams,
    "ppo": PPOParams,
    "report": ReportParams,
}


def set_dotted(data: dict, overrides: dict[str, Any] | None, path: Path) -> dict:
    """The one dotted-override setter: `{"training.lr": 1e-3}` sets data["training"]["lr"] (in place, so a
    ruamel round-trip mapping keeps its comments). Used by `--set`, flow parameters and the pipeline's
    params-file edits."""
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise UserError(f"{path}: override '{dotted}': '{key}' is not a mapping")
        node[leaf] = value
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; a params file that says `lr` twice is a
    mistake to point at, not a value to guess."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_params(stage: str, params_dir: str | Path = "params", overrides: dict[str, Any] | None = None):
    """Load and validate `params/<stage>.yaml` into its typed config."""
    model = STAGE_MODELS.get(stage)
    if model is None:
        raise UserError(f"unknown stage '{stage}' (known: {', '.join(STAGE_MODELS)})")
    path = Path(params_dir) / f"{stage}.yaml"
    if not path.is_file():
        raise UserError(f"{path}: params file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    data = set_dotted(data, overrides, path)
    if isinstance(data.get("training"), dict) and "precision" in data["training"]:
        raise UserError(f"{path}: key 'training.precision': set `precision` in {Path(params_dir) / 'base.yaml'} "
                        "(one knob for every stage)")
    try:
        cfg = model.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(path, exc)) from None
    if isinstance(getattr(cfg, "training", None), TrainingArgs):
        from refinery.modeling.precision import resolve

        has_base = (Path(params_dir) / "base.yaml").is_file()  # a lone stage file (tests, scripts): the default
        cfg.training.precision = resolve((load_params("base", params_dir) if has_base else BaseParams()).precision)
        if cfg.training.use_liger_kernel:
            check_liger(path)
    return cfg


def check_liger(path: Path) -> None:
    """Liger's kernels are Triton kernels for CUDA GPUs: say so before anything loads, not from inside Trainer."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{path}: training.use_liger_kernel: Liger's kernels need a CUDA GPU (none here); set it false")
    if importlib.util.find_spec("liger_kernel") is None:
        raise UserError(f"{path}: training.use_liger_kernel: liger-kernel is not installed "
                        "(pip install -e '.[gpu]', or pip install liger-kernel)")


def format_validation_error(path: Path, exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (typo?)"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{path}: key '{key}': {msg}{more}"


def apply_overrides(overrides: dict[str, dict], params_dir: str = "params") -> None:
    """{"sft": {"method": "ia3"}} -> params/sft.yaml (comments kept), validated before anything runs,
    the same edit `dvc exp run -S params/sft.yaml:method=ia3` makes."""
    from ruamel.yaml import YAML

    rt = YAML()
    for stage, values in (overrides or {}).items():
        path = Path(params_dir) / f"{stage}.yaml"
        if not path.is_file():
            raise UserError(f"{path}: no params file for stage '{stage}'")
        load_params(stage, params_dir, values)  # refuse bad values before writing
        data = rt.load(path.read_text())
        set_dotted(data, values, path)
        with open(path, "w") as fh:
            rt.dump(data, fh)
