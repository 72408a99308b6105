"""Typed configuration: frozen dataclasses, YAML files, dotted command-line overrides, one validate().

A job declares its config as a frozen dataclass whose fields are other frozen dataclasses (sections). Each
field carries a docstring (the string literal under it), shown by ``--help``. Loading goes:

    YAML file  ->  merged with ``a.b.c=value`` overrides  ->  type-checked build  ->  validate()

Anything wrong (missing file, bad YAML, unknown key, wrong type, an impossible combination) raises
:class:`ConfigError` with one line naming the source, the key and what was expected; jobs turn it into
exit code 2 through :func:`parse_job_config`. Nothing is silently rewritten.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

COMMAND_LINE = "command line"
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration problem, described in one line."""


def require_at_least(key: str, value: int, minimum: int) -> None:
    """Raise ConfigError unless the int ``value`` of ``key`` is >= ``minimum``."""
    if value < minimum:
        raise ConfigError(f"{key}: expected an int >= {minimum}, got {value}")


# --------------------------------------------------------------------------------------------------------------
# Sections shared by the jobs. Job-specific sections live beside the job's top-level config.
# --------------------------------------------------------------------------------------------------------------

DTYPES = ("best", "auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """Model to load: an embedded name (see `rayalign.models.EMBEDDED`), a local HF directory or an HF hub id."""
    dtype: Literal["best", "auto", "float32", "bfloat16", "float16"] = "best"
    """Weights dtype for the inference engines: "best" is bfloat16 on a GPU or a CPU with native bf16 (AVX512-BF16
    or AMX) and float32 on other CPUs, where bf16 is emulated and slower (rayalign.resources.engine_dtype); "auto"
    takes the checkpoint's own."""
    trust_remote_code: bool = False
    """Allow model code shipped with a hub checkpoint to run (only for models you trust)."""


@dataclasses.dataclass(frozen=True)
class RayConfig:
    address: str = ""
    """Ray cluster to join. Empty: $RAY_ADDRESS when set, otherwise a new local Ray started by the job."""
    num_cpus: int | None = None
    """CPUs of the local Ray started by the job (None: all of this machine's). Ignored when joining a cluster."""
    namespace: str = "rayalign"
    """Ray namespace for the job's named actors."""
    dashboard: bool = True
    """Start the Ray dashboard (on 127.0.0.1) with a local Ray; Ray Train's controller monitoring uses its state API."""
    resource_wait_s: float = 600.0
    """On a cluster with an autoscaler, how long the job waits for it to add the nodes its actors need before it
    stops with one line naming what is missing (a cluster without one, or a local Ray, is refused at once)."""

    def validate(self) -> None:
        if self.resource_wait_s < 0:
            raise ConfigError(f"ray.resource_wait_s: expected a float >= 0, got {self.resource_wait_s}")


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    experiment: str = "rayalign"
    """MLflow experiment name. The tracking store is $MLFLOW_TRACKING_URI, or ./mlflow.db in the working directory."""
    run_name: str = ""
    """MLflow run name (empty: MLflow picks one)."""
    sample_every: int = 1
    """Log a table of (prompt, response, ...) samples every this many steps."""

    def validate(self) -> None:
        require_at_least("tracking.sample_every", self.sample_every, 1)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    max_new_tokens: int = 64
    """Most tokens generated per response."""
    n: int = 1
    """Responses sampled per prompt (GRPO/RLOO groups need n >= 2)."""
    stop: tuple[str, ...] = ()
    """Strings that end a response (not included in it)."""
    seed: int | None = None
    """Sampling seed (None: vLLM's own)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token up to max_new_tokens (fixed lengths, for benchmarks)."""

    def validate(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature: expected a float >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p: expected a float in (0, 1], got {self.top_p}")
        require_at_least("sampling.max_new_tokens", self.max_new_tokens, 1)
        require_at_least("sampling.n", self.n, 1)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    num_engines: int = 1
    """vLLM engine replicas; a batch is split evenly across them."""
    tensor_parallel_size: int = 1
    """GPUs per engine (tensor parallel). Must be 1 on CPU."""
    max_model_len: int = 1024
    """Longest prompt + response, in tokens, that an engine accepts."""
    gpu_memory_utilization: float = 0.5
    """Share of each GPU's memory that vLLM may take (GPU only)."""
    cpu_kvcache_gib: int = 1
    """KV cache size per engine on CPU, in GiB (sets VLLM_CPU_KVCACHE_SPACE)."""
    num_cpus: float = 1.0
    """Ray CPUs reserved for each engine actor."""
    num_gpus: float = 0.0
    """Ray GPUs reserved for each engine actor (0 on CPU; tensor_parallel_size on GPU, or a fraction of one GPU
    with tensor_parallel_size 1 to share it, with gpu_memory_utilization lowered to match)."""
    accelerator_type: str = ""
    """Ray accelerator type the engines must run on (e.g. "H100", "A10G"); "" takes any node that fits."""
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    """Custom Ray resources each engine actor reserves, to pin engines to the nodes that offer them (e.g.
    {"rollout": 1} with `ray start --resources='{"rollout": 4}'` or a KubeRay group's `resources`)."""
    enforce_eager: bool = True
    """Skip torch.compile and CUDA graphs: much faster engine start, somewhat slower decode (README, "Configs")."""
    cpu_threads_bind: str = "split"
    """CPU engines only: cores their OpenMP threads use. "split" gives each engine on this node its own share of
    the cores this process may use; "vllm" keeps vLLM's default (one core, another left to its front end); anything
    else is passed as VLLM_CPU_OMP_THREADS_BIND (e.g. "0-3")."""

    def validate(self) -> None:
        require_at_least("engine.num_engines", self.num_engines, 1)
        require_at_least("engine.tensor_parallel_size", self.tensor_parallel_size, 1)
        if self.num_gpus == 0 and self.tensor_parallel_size != 1:
            raise ConfigError(
                f"engine.tensor_parallel_size={self.tensor_parallel_size} needs GPUs, but engine.num_gpus=0 (CPU engines use 1)"
            )
        if self.tensor_parallel_size > 1 and self.num_gpus < self.tensor_parallel_size:  # 1: may share a GPU
            raise ConfigError(
                f"engine.num_gpus={self.num_gpus} is less than engine.tensor_parallel_size={self.tensor_parallel_size}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"engine.gpu_memory_utilization: expected a float in (0, 1], got {self.gpu_memory_utilization}"
            )
        require_at_least("engine.max_model_len", self.max_model_len, 16)
        require_at_least("engine.cpu_kvcache_gib", self.cpu_kvcache_gib, 1)
        check_resources_field("engine.resources", self.resources)


def check_resources_field(key: str, resources: dict[str, float]) -> None:
    """Custom Ray resources: names other than Ray's own (CPU, GPU, memory: set by their own keys), amounts >= 0."""
    for name, amount in resources.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ConfigError(f"{key}.{name}: set {name} with its own key (num_cpus / num_gpus), not as a custom resource")
        if amount < 0:
            raise ConfigError(f"{key}.{name}: expected an amount >= 0, got {amount}")


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ranks vLLM 0.32 accepts as ``max_lora_rank``: an engine serves adapters of any rank up to its slot."""


def lora_rank_slot(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that fits an adapter of rank ``rank`` (ValueError above 512)."""
    for slot in VLLM_LORA_RANKS:
        if slot >= rank:
            return slot
    raise ValueError(f"LoRA rank {rank} is above vLLM's limit {VLLM_LORA_RANKS[-1]}")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    """LoRA rank r: one of vLLM's LoRA ranks (`VLLM_LORA_RANKS`), so that the rollout engines can load the
    adapter."""
    alpha: float = 32.0
    """LoRA scaling numerator (the update is scaled by alpha / rank)."""
    dropout: float = 0.0
    """Dropout on the LoRA input during training (jobs/ppo.py needs 0: its ratio compares two passes)."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Names of the linear layers that get adapters (Llama-style names by default)."""

    def validate(self) -> None:
        if self.rank not in VLLM_LORA_RANKS:
            raise ConfigError(f"lora.rank: the rollout engines (vLLM) load adapters of rank "
                              f"{', '.join(map(str, VLLM_LORA_RANKS))}; got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: expected a float in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules: expected at least one module name")


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    backend: Literal["vllm", "openai", "ray_serve_llm"] = "vllm"
    """"vllm": the judge model hosted by rayalign on Ray Serve (a step's pairs in one request, one vLLM call);
    "openai": any OpenAI-compatible endpoint; "ray_serve_llm": the judge model as a ray.serve.llm app in this job,
    judged over its OpenAI routes (the vllm backend's model, dtype, engine and replica settings apply)."""
    model: str = "smollm2-135m-instruct"
    """vllm backend: the judge model (embedded name, HF directory or hub id)."""
    dtype: Literal["best", "auto", "float32", "bfloat16", "float16"] = "best"
    """vllm backend: weights dtype ("best": as model.dtype's)."""
    rubric: str = "vegetarian"
    """A rubric shipped in jobs/rubrics/ (by name) or a path to a rubric YAML file."""
    mode: Literal["score", "logprob"] = "score"
    """"score": the judge writes a number in [0.01, 0.99] (pre-filled "Score:", so the number comes first);
    "logprob": P(yes) of a yes/no answer. Score is the default: on the shipped validation set the SmolLM2 judge
    ranks answers better in score mode (README, "The judge, validated")."""
    transform: Literal["logit", "identity"] = "logit"
    """Reward = transform(clamp(score)); logit pushes mediocre scores down."""
    clamp: tuple[float, ...] = (0.01, 0.99)
    """Scores are clamped to [clamp[0], clamp[1]] before the transform."""
    url: str = ""
    """openai backend: base URL, e.g. http://127.0.0.1:8000/v1 (…/chat/completions is appended)."""
    endpoint_model: str = ""
    """openai backend: the model name sent in each request."""
    api_key_env: str = ""
    """openai backend: name of the environment variable that holds the API key (the key itself is never logged)."""
    timeout_s: float = 60.0
    """Seconds before one judge request times out."""
    max_retries: int = 3
    """Retries of a request that timed out or failed with 5xx / 429 / a connection error."""
    backoff_s: float = 0.5
    """First retry delay; doubles at each retry."""
    breaker_failures: int = 8
    """This many requests failing in a row (after their retries) stop the job: the endpoint is down."""
    concurrency: int = 16
    """openai backend: requests in flight at once."""
    num_replicas: int = 1
    """vllm backend: Serve replicas at start (each a vLLM engine)."""
    max_replicas: int = 1
    """vllm backend: autoscaling upper bound (> num_replicas enables Serve autoscaling)."""
    max_batch_size: int = 32
    """vllm backend: requests a replica gathers into one vLLM call (Serve request batching)."""
    batch_wait_timeout_s: float = 0.1
    """vllm backend: how long a replica waits to fill a batch."""
    engine: EngineConfig = EngineConfig(max_model_len=2048)
    """vllm backend: the judge's engine settings (tensor_parallel_size, memory...)."""
    start_timeout_s: float = 1800.0
    """vllm backend: seconds the judge deployment may take to start (a 70B judge loads for minutes); past it, or on
    a failed deploy, the job stops with one line naming the deployment."""

    def validate(self) -> None:
        if len(self.clamp) != 2 or not 0 < self.clamp[0] < self.clamp[1] < 1:
            raise ConfigError(f"judge.clamp: expected [low, high] with 0 < low < high < 1, got {list(self.clamp)}")
        if self.backend == "openai" and not self.url:
            raise ConfigError("judge.url: the openai backend needs the endpoint's base URL")
        if self.backend == "openai" and not self.endpoint_model:
            raise ConfigError("judge.endpoint_model: the openai backend needs the model name to request")
        if self.max_retries < 0 or self.breaker_failures < 1 or self.concurrency < 1:
            raise ConfigError("judge: max_retries must be >= 0, breaker_failures and concurrency >= 1")
        if self.timeout_s <= 0 or self.backoff_s < 0 or self.start_timeout_s <= 0:
            raise ConfigError("judge: timeout_s and start_timeout_s must be > 0 and backoff_s >= 0")
        if not 1 <= self.num_replicas <= self.max_replicas:
            raise ConfigError(f"judge: expected 1 <= num_replicas ({self.num_replicas}) <= max_replicas "
                              f"({self.max_replicas})")
        require_at_least("judge.max_batch_size", self.max_batch_size, 1)


@dataclasses.dataclass(frozen=True)
class RewardComponent:
    name: str = "judge"
    """Name under which this component's reward is logged (reward/<name>)."""
    kind: Literal["judge", "rule", "reward_model"] = "judge"
    """"judge": the configured LLM judge; "rule": a Python rule function from rayalign.judge.rules;
    "reward_model": a sequence classifier (HF ``AutoModelForSequenceClassification``) in its own Ray actor."""
    weight: float = 1.0
    """Weight of this component's reward in the sum."""
    rule: str = ""
    """kind=rule: the rule's name (e.g. vegetarian_lexicon)."""
    model: str = ""
    """kind=reward_model: an HF sequence-classifier directory (or a hub id, for clusters with a model cache).
    One output label: reward = that logit; two: reward = logit[1] - logit[0] (log-odds of "good")."""
    batch_size: int = 16
    """kind=reward_model: sequences per forward pass."""
    max_length: int = 2048
    """kind=reward_model: longer (prompt, response) pairs fail (dropped and counted), never truncated silently."""
    num_cpus: float = 1.0
    """kind=reward_model: CPUs Ray reserves for the reward model's actor."""
    num_gpus: float = 0.0
    """kind=reward_model: GPUs for the reward model's actor (0: CPU)."""
    torch_threads: int | None = None
    """kind=reward_model on CPU: torch threads of the actor (None: every core of its node, since a step's phases
    take turns; Ray would give it one thread per reserved CPU). Set it where the node is shared with busy actors."""
    timeout_s: float = 600.0
    """kind=reward_model: seconds one scoring call may take before the reward model counts as unavailable."""

    def validate(self) -> None:
        if self.kind == "rule" and not self.rule:
            raise ConfigError(f"reward component '{self.name}': kind=rule needs rule=<name>")
        if self.kind == "reward_model":
            if not self.model:
                raise ConfigError(f"reward component '{self.name}': kind=reward_model needs model=<HF dir or id>")
            require_at_least(f"reward component '{self.name}' batch_size", self.batch_size, 1)
            require_at_least(f"reward component '{self.name}' max_length", self.max_length, 8)
            if self.torch_threads is not None:
                require_at_least(f"reward component '{self.name}' torch_threads", self.torch_threads, 1)
            if self.num_cpus < 0 or self.num_gpus < 0 or self.timeout_s <= 0:
                raise ConfigError(f"reward component '{self.name}': num_cpus and num_gpus must be >= 0 and "
                                  f"timeout_s > 0")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    judge: JudgeConfig = JudgeConfig()
    """The LLM judge (used by components of kind "judge")."""
    components: tuple[RewardComponent, ...] = ()
    """Weighted components; empty means the judge alone with weight 1."""

    def validate(self) -> None:
        for c in self.components:
            c.validate()
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise ConfigError(f"reward.components: names must be unique, got {names}")


CPU_DEFAULT_REWARD = RewardConfig(
    judge=JudgeConfig(mode="score"),
    components=(RewardComponent(name="judge", kind="judge", weight=0.5),
                RewardComponent(name="lexicon", kind="rule", weight=1.0, rule="vegetarian_lexicon")),
)
"""The CPU default reward (jobs/configs/reward_cpu_default.yaml): the SmolLM2 judge plus the vegetarian lexicon,
the composite chosen with jobs/validate_judge.py."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    prompts: str = "builtin:vegetarian/train"
    """Prompts: JSONL/Parquet with a `prompt` field, or a shipped dataset `builtin:<name>/<split>`."""
    limit: int | None = None
    """Use at most this many prompts (None: all)."""

    def validate(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit: expected an int >= 1 or null, got {self.limit}")


@dataclasses.dataclass(frozen=True)
class HeldOutConfig:
    """The held-out report a training job ends with: the base and the aligned policy answer the same held-out
    prompts greedily, side by side (rayalign.evaluation.report)."""

    enabled: bool = True
    """Answer the held-out prompts with the base and the aligned policy at the end, and report both."""
    prompts: str = "builtin:vegetarian/holdout"
    """The held-out prompts (never trained on)."""
    limit: int | None = None
    """At most this many held-out prompts (None: all)."""
    max_new_tokens: int = 96
    """Tokens per held-out answer (greedy)."""
    rule: str = "vegetarian_lexicon"
    """Rule from rayalign.judge.rules that counts violations beside the judge (empty: none)."""
    examples: int = 3
    """Side-by-side examples printed and logged (the prompts where the two models differ most)."""

    def validate(self) -> None:
        from rayalign.judge.rules import RULES

        if self.rule and self.rule not in RULES:
            raise ConfigError(f"heldout.rule: unknown rule '{self.rule}' (known: {', '.join(sorted(RULES))})")
        require_at_least("heldout.max_new_tokens", self.max_new_tokens, 1)
        require_at_least("heldout.examples", self.examples, 0)
        if self.limit is not None:
            require_at_least("heldout.limit", self.limit, 1)

    @property
    def sampling(self) -> "SamplingConfig":
        """Greedy, so a rerun gives the same answers."""
        return SamplingConfig(temperature=0.0, max_new_tokens=self.max_new_tokens, seed=0)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 32
    """Rows per batch sent to each vLLM engine (and to the judge) by the Ray Data stages."""
    shard_size: int = 32
    """Input rows per output shard: the unit written at once, and the most a crash can lose."""
    judge_timeout_s: float = 600.0
    """Seconds one row's request to the Serve judge may wait -- it queues behind every batch in flight -- before
    that row fails (dropped and counted). reward.judge.timeout_s is the RL loop's, per whole judge call."""

    def validate(self) -> None:
        if self.judge_timeout_s <= 0:
            raise ConfigError(f"pipeline.judge_timeout_s: expected > 0, got {self.judge_timeout_s}")
        require_at_least("pipeline.batch_size", self.batch_size, 1)
        require_at_least("pipeline.shard_size", self.shard_size, 1)


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    dir: str = ""
    """Output directory: a folder of Parquet shards per table and manifest.json. A re-run with the same settings
    skips the shards already written."""
    overwrite: bool = False
    """Start over in a directory that holds shards made with other settings (otherwise refused)."""

    def validate(self) -> None:
        if not self.dir:
            raise ConfigError("output.dir: the generation jobs need an output directory")


GROUPED_ALGORITHMS = frozenset({"grpo", "rloo", "reinforce_pp_baseline", "dr_grpo", "gspo"})
"""Algorithms whose advantages compare the responses to one prompt."""
KL_IN_LOSS_BY_DEFAULT = frozenset({"grpo", "dr_grpo", "gspo"})
"""Algorithms whose KL penalty goes into the loss unless algorithm.kl_in says otherwise."""


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    name: Literal["ppo", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "dr_grpo", "gspo"] = "ppo"
    """"ppo": GAE with a value head; "grpo": group-normalised rewards, no critic; "rloo": leave-one-out baselines;
    "reinforce_pp": REINFORCE++, KL-shaped returns whitened over the batch, no critic; "reinforce_pp_baseline":
    the same on rewards minus the group mean; "dr_grpo": GRPO without the std division or per-answer length
    normalisation; "gspo": GRPO's advantages with one clipped, length-normalised importance ratio per sequence.
    Every one but ppo and reinforce_pp samples sampling.n responses per prompt as a group."""
    epochs: int = 1
    """Passes over each step's batch."""
    minibatch_size: int = 8
    """Sequences per optimizer step, over all learner workers."""
    clip_eps: float = 0.2
    """PPO ratio clip (the lower bound, 1 - clip_eps; gspo clips its sequence ratio with it, where the paper
    uses 3e-4)."""
    clip_eps_high: float | None = None
    """DAPO's clip-higher: the upper bound 1 + clip_eps_high (null: clip_eps; DAPO uses 0.28 with clip_eps 0.2)."""
    loss_agg: Literal["token_mean", "seq_mean", "seq_sum_norm"] | None = None
    """How per-token losses are averaged: "token_mean" over every token of the minibatch (DAPO's token-level
    loss), "seq_mean" per answer then over answers (original GRPO), "seq_sum_norm" each answer's sum over
    norm_tokens (Dr. GRPO); null: seq_sum_norm for dr_grpo, token_mean otherwise. gspo's loss is per sequence
    and takes none."""
    norm_tokens: int = 0
    """The constant divisor of seq_sum_norm (0: sampling.max_new_tokens)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop prompt groups whose rewards all tie (no signal) and sample more prompts, up
    to max_sampling_rounds extra rounds, until the step has prompts_per_step groups (grouped algorithms only)."""
    max_sampling_rounds: int = 3
    """Extra generate-and-judge rounds a step may take to refill dropped groups (dynamic_sampling); a step still
    short after them trains on the groups it has."""
    dynamic_sampling_by: str = "reward"
    """Dynamic sampling only: what must differ within a prompt group for dynamic sampling to keep it: "reward" (the summed reward, as in
    DAPO) or the name of one reward component (e.g. "lexicon"). A component other than the judge is scored first,
    and only the groups it keeps (at most prompts_per_step) go to the judge. With a judge whose scores never tie
    exactly, "reward" keeps every group; a rule's verdicts tie in the groups that tell the policy nothing."""
    oversample: int = 1
    """Dynamic sampling only: each round generates this many times the groups still missing (the first round
    prompts_per_step x oversample prompts), and the step keeps at most prompts_per_step groups. Decoding on CPU
    is bound by reading the weights, so a larger batch costs little more time than a small one."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: over the last this many tokens before sampling.max_new_tokens the reward
    falls linearly by up to overlong_penalty (0: off)."""
    overlong_penalty: float = 1.0
    """The largest overlong punishment, reached at sampling.max_new_tokens."""
    tis_cap: float | None = None
    """Truncated importance sampling for the engine/learner mismatch: weight each token's loss by
    min(pi_learner_old / pi_engine, tis_cap) (null: off; 2.0 is the usual cap)."""
    value_clip_eps: float = 0.2
    """Value clip around the old values (ppo)."""
    vf_coef: float = 0.1
    """Weight of the value loss (ppo; the value head shares the policy's backbone)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    gamma: float = 1.0
    """GAE discount (ppo)."""
    lam: float = 0.95
    """GAE lambda (ppo)."""
    kl_coef: float = 0.05
    """KL(policy || reference) coefficient (the start value when kl_target is set). 0 (TRL's GRPO default): the
    learner keeps no reference and runs no reference pass, and the job reports no KL (there is nothing to measure
    it against)."""
    kl_target: float | None = None
    """Adaptive KL controller target (Ziegler et al.); null keeps kl_coef fixed."""
    kl_horizon: int = 10000
    """Adaptive KL controller horizon, in samples."""
    kl_estimator: Literal["k1", "k3"] | None = None
    """Per-token KL estimator; null: k1 with the KL in the reward, k3 with it in the loss. k1 in the loss is
    refused: its gradient is zero in expectation over the policy's own samples (E[grad log pi] = 0), so it would
    not pull the policy toward the reference."""
    kl_in: Literal["reward", "loss"] | None = None
    """Where the KL penalty goes: shaped into the token rewards or added to the loss; null: the loss for grpo,
    dr_grpo and gspo, the reward for the others. grpo and gspo with the KL in the reward are refused: dividing by
    the group's reward std would scale the penalty up to full-size advantages whenever a group's scores are
    equal."""
    whiten_advantages: bool = True
    """Normalise advantages over the batch (ppo)."""

    @property
    def kl_in_loss(self) -> bool:
        """Whether the KL penalty goes into the loss (``kl_in``, or the algorithm's default)."""
        return (self.kl_in or ("loss" if self.name in KL_IN_LOSS_BY_DEFAULT else "reward")) == "loss"

    @property
    def grouped(self) -> bool:
        """Whether advantages compare the sampling.n responses to one prompt (and judging drops whole groups)."""
        return self.name in GROUPED_ALGORITHMS

    @property
    def aggregation(self) -> str:
        """The loss aggregation (``loss_agg``, or the algorithm's default); "sequence" for gspo."""
        if self.name == "gspo":
            return "sequence"
        return self.loss_agg or ("seq_sum_norm" if self.name == "dr_grpo" else "token_mean")

    @property
    def estimator(self) -> str:
        """The per-token KL estimator (``kl_estimator``, or the default for where the KL goes)."""
        return self.kl_estimator or ("k3" if self.kl_in_loss else "k1")

    def validate(self) -> None:
        require_at_least("algorithm.epochs", self.epochs, 1)
        if self.kl_in_loss and self.estimator == "k1":
            raise ConfigError("algorithm.kl_estimator: k1 in the loss has a zero expected gradient (it would not "
                              "hold the policy near the reference); use k3 with algorithm.kl_in=loss")
        if self.name in ("grpo", "gspo") and not self.kl_in_loss:
            raise ConfigError(f"algorithm.kl_in: {self.name} divides rewards by the group's std, which would scale a "
                              f"KL penalty in the reward up to full-size advantages; use kl_in=loss (its default)")
        if self.name == "gspo" and self.loss_agg is not None:
            raise ConfigError("algorithm.loss_agg: gspo's loss is one clipped ratio per sequence; leave loss_agg "
                              "unset")
        if self.clip_eps_high is not None and self.clip_eps_high <= 0:
            raise ConfigError(f"algorithm.clip_eps_high: expected a float > 0 (or null), got {self.clip_eps_high}")
        if self.dynamic_sampling and not self.grouped:
            raise ConfigError(f"algorithm.dynamic_sampling: {self.name} has no prompt groups to drop; set "
                              f"algorithm.dynamic_sampling=false or use one of {', '.join(sorted(GROUPED_ALGORITHMS))}")
        require_at_least("algorithm.max_sampling_rounds", self.max_sampling_rounds, 0)
        require_at_least("algorithm.oversample", self.oversample, 1)
        require_at_least("algorithm.norm_tokens", self.norm_tokens, 0)
        require_at_least("algorithm.overlong_buffer", self.overlong_buffer, 0)
        if self.overlong_penalty < 0:
            raise ConfigError(f"algorithm.overlong_penalty: expected a float >= 0, got {self.overlong_penalty}")
        if self.tis_cap is not None and self.tis_cap < 1:
            raise ConfigError(f"algorithm.tis_cap: expected a float >= 1 (or null), got {self.tis_cap}")
        require_at_least("algorithm.minibatch_size", self.minibatch_size, 1)
        if self.clip_eps <= 0 or self.value_clip_eps <= 0:
            raise ConfigError("algorithm.clip_eps and algorithm.value_clip_eps must be > 0")
        if self.kl_coef < 0 or (self.kl_target is not None and self.kl_target <= 0):
            raise ConfigError("algorithm.kl_coef must be >= 0 and algorithm.kl_target > 0 (or null)")
        if self.kl_target is not None and self.kl_coef == 0:
            raise ConfigError("algorithm.kl_target needs algorithm.kl_coef > 0 (an adaptive coefficient that starts "
                              "at 0 stays 0)")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError("algorithm.gamma and algorithm.lam must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    name: Literal["dpo", "ipo", "kto", "simpo"] = "dpo"
    """"dpo": -log sigmoid of the implicit reward margin (with label_smoothing > 0: conservative DPO); "ipo": the
    margin regressed to 1 / (2 beta); "kto": binary good/bad labels, one response per row; "simpo": reference-free,
    length-normalised, with a target margin."""
    beta: float = 0.1
    """Strength of the implicit KL to the reference (dpo/ipo/kto: ~0.1); simpo's reward scale (its paper: 2-2.5)."""
    label_smoothing: float = 0.0
    """dpo only: the probability that a preference label is wrong (conservative DPO), in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """simpo only: the target reward margin between chosen and rejected."""
    kto_desirable_weight: float = 1.0
    """kto only: weight of the desirable (label 1) examples' loss."""
    kto_undesirable_weight: float = 1.0
    """kto only: weight of the undesirable (label 0) examples' loss."""
    epochs: int = 1
    """Passes over the training pairs."""
    minibatch_size: int = 8
    """Examples (pairs; rows for kto) per optimizer step, over all learner workers."""

    def validate(self) -> None:
        require_at_least("algorithm.epochs", self.epochs, 1)
        require_at_least("algorithm.minibatch_size", self.minibatch_size, 1)
        if self.beta <= 0:
            raise ConfigError(f"algorithm.beta: expected a float > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"algorithm.label_smoothing: expected a float in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.name != "dpo":
            raise ConfigError(f"algorithm.label_smoothing: conservative DPO is a form of dpo, not {self.name}")
        if self.kto_desirable_weight <= 0 or self.kto_undesirable_weight <= 0:
            raise ConfigError("algorithm.kto_desirable_weight and kto_undesirable_weight must be > 0")

    @property
    def paired(self) -> bool:
        """Whether each example is a chosen/rejected pair (two rows) rather than one labelled response (kto)."""
        return self.name != "kto"


@dataclasses.dataclass(frozen=True)
class PreferenceDataConfig:
    train: str = "builtin:vegetarian/pairs"
    """Pairs (prompt/chosen/rejected) or, for kto, prompt/completion/label: JSONL, Parquet, a saved `datasets`
    directory or a shipped set builtin:<name>/<split>."""
    eval: str = ""
    """A separate eval set in the same form (empty: hold out eval_fraction of train)."""
    eval_fraction: float = 0.1
    """Share of train held out for evaluation when eval is empty."""
    limit: int | None = None
    """Use at most this many training examples (None: all)."""
    max_length: int = 512
    """Examples with a row of more prompt + response tokens are skipped and counted."""

    def validate(self) -> None:
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction: expected a float in [0, 1), got {self.eval_fraction}")
        require_at_least("data.max_length", self.max_length, 8)
        if self.limit is not None:
            require_at_least("data.limit", self.limit, 1)


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
    train: str = "builtin:vegetarian/pipeline_pairs"
    """(prompt, response) rows -- TRL's prompt/completion, a `messages` conversation, or a pair whose chosen side is
    the answer -- as JSONL, Parquet, a saved `datasets` directory or a shipped set builtin:<name>/<split>. The
    default: the shipped pipeline pairs' chosen answers (judged best, many rewritten against the constitution)."""
    response_column: str = "chosen"
    """The column that holds the response (text, or a conversation ending in the assistant's turn); "": the first
    of completion, response, chosen, messages that the rows hold."""
    eval: str = ""
    """A separate eval set in the same form (empty: hold out eval_fraction of train)."""
    eval_fraction: float = 0.1
    """Share of train held out for evaluation when eval is empty."""
    limit: int | None = None
    """Use at most this many training examples (None: all)."""
    max_length: int = 512
    """Examples of more prompt + response tokens are skipped and counted; with packing, also each packed row's
    capacity."""
    packing: bool = True
    """Pack several examples into each row of max_length tokens (attention kept inside each example) instead of
    padding every example to the longest of its micro-batch."""

    def validate(self) -> None:
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction: expected a float in [0, 1), got {self.eval_fraction}")
        require_at_least("data.max_length", self.max_length, 8)
        if self.limit is not None:
            require_at_least("data.limit", self.limit, 1)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    name: Literal["sft"] = "sft"
    """Supervised fine-tuning: the mean negative log-likelihood of the response tokens (the prompt is context)."""
    epochs: int = 1
    """Passes over the training rows."""
    minibatch_size: int = 4
    """Rows per optimizer step, over all learner workers: packed rows of up to data.max_length tokens each
    (data.packing=true), else examples."""

    def validate(self) -> None:
        require_at_least("algorithm.epochs", self.epochs, 1)
        require_at_least("algorithm.minibatch_size", self.minibatch_size, 1)


@dataclasses.dataclass(frozen=True)
class RewardTrainingConfig:
    name: Literal["reward_model"] = "reward_model"
    """A scalar-head sequence classifier trained on pairs with -log sigmoid(r(x, chosen) - r(x, rejected) - m)."""
    margin_scale: float = 0.0
    """Llama 2's margin m = margin_scale x (chosen_score - rejected_score), for pairs that carry their judge's
    scores (0: no margin; pairs without scores take m = 0 and are counted)."""
    epochs: int = 1
    """Passes over the training pairs."""
    minibatch_size: int = 8
    """Pairs per optimizer step, over all learner workers."""

    def validate(self) -> None:
        require_at_least("algorithm.epochs", self.epochs, 1)
        require_at_least("algorithm.minibatch_size", self.minibatch_size, 1)
        if self.margin_scale < 0:
            raise ConfigError(f"algorithm.margin_scale: expected a float >= 0, got {self.margin_scale}")


LEARNER_MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                           "glibc.malloc.trim_threshold=18446744073709551615:glibc.malloc.hugetlb=1")
"""`LearnerConfig.malloc_tunables`' default: every thread allocates from one arena, never through its own mmap
(mmap_max=0: large tensors come from the heap too), and the heap is never trimmed, so freed memory is reused as it
is; the heap's pages are transparent huge pages where the kernel allows them on request (madvise)."""


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    finetune: Literal["lora", "full"] = "lora"
    """"lora": train a peft adapter (the reference is the base with the adapter off); "full": every weight (the
    reference is a frozen copy)."""
    lora_sync: Literal["adapter", "merged"] = "merged"
    """How LoRA updates reach the rollout engines: "adapter" (vLLM dynamic LoRA, ~20 MB per sync, but decoding runs
    vLLM's LoRA kernels, about half speed on CPU) or "merged" (the adapter folded into the weights, ~270 MB per sync
    through shared memory on the learner's rank-0 node, copied through the object store to engines on other nodes;
    engines decode at base-model speed)."""
    full_sync: Literal["shared_memory", "broadcast"] = "shared_memory"
    """How full weights (finetune=full, or LoRA under lora_sync=merged) reach the engines: "shared_memory" (files on
    the learner's rank-0 node; engines on other nodes first copy them through the object store) or "broadcast" (a
    collective broadcast from rank 0 to every engine worker, NCCL when the learner is on GPU and gloo on CPU: the
    transport for multi-node clusters)."""
    num_workers: int = 1
    """Ray Train workers (data parallel, one DeepSpeed rank each)."""
    num_cpus_per_worker: float = 1.0
    """CPUs Ray reserves per worker."""
    num_gpus_per_worker: float = 0.0
    """GPUs per worker (0: CPU training, DeepSpeed's CPU accelerator over gloo)."""
    accelerator_type: str = ""
    """Ray accelerator type the workers must run on (e.g. "H100"); "" takes any node that fits."""
    resources_per_worker: dict[str, float] = dataclasses.field(default_factory=dict)
    """Custom Ray resources each worker reserves, to pin the learner to the nodes that offer them (e.g.
    {"learner": 1})."""
    torch_threads: int | None = None
    """Intra-op threads per CPU worker (null: the node's cores divided by the workers; Ray would give 1)."""
    malloc_tunables: str = LEARNER_MALLOC_TUNABLES
    """glibc malloc settings of the worker processes (their GLIBC_TUNABLES; "" leaves glibc's own). The default
    keeps the memory a micro-batch frees for the next one, in one arena, on transparent huge pages where the kernel
    offers them (madvise). With glibc's defaults a CPU learner worker hands each forward's activations back to the
    OS and faults them in again (33-150k page faults per 512-token forward of SmolLM2; 1-164 with these). Measured
    in the README ("SFT throughput")."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Training dtype (bfloat16 uses DeepSpeed's bf16 mode with fp32 master weights)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0-2 keep whole weights on every rank; 3 shards them too, and the frozen reference of
    a full finetune (for models whose weights do not fit one worker), at the price of a gather per layer in every
    forward and weight export."""
    lr: float = 5e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up, in optimizer steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one worker (gradients accumulate up to the minibatch)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (saves memory, costs ~30% time)."""
    shared_prompt: bool = True
    """Paired objectives (dpo, ipo, simpo): run each pair's prompt once, its KV cache shared by both responses,
    instead of once per response (not under ZeRO-3, where every pair runs whole)."""
    packing: bool = True
    """RL and preference passes: run each micro-batch's sequences back to back in one row, each distinct prompt
    once with every response to it after it (a GRPO group's), attention kept inside each (prompt, response),
    instead of right-padded rows: no compute on padding or repeated prompts. The losses see the padded layout
    either way (the results are gathered back to it); false: padded rows. (SFT's packed rows are data.packing.)"""

    def validate(self) -> None:
        require_at_least("learner.num_workers", self.num_workers, 1)
        require_at_least("learner.micro_batch_size", self.micro_batch_size, 1)
        if self.torch_threads is not None:
            require_at_least("learner.torch_threads", self.torch_threads, 1)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"learner.zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage}")
        if self.lr <= 0:
            raise ConfigError(f"learner.lr: expected a float > 0, got {self.lr}")
        if any(not part.startswith("glibc.") or "=" not in part for part in self.malloc_tunables.split(":")
               if self.malloc_tunables):
            raise ConfigError(f"learner.malloc_tunables: expected glibc.<name>=<value> settings joined by ':', "
                              f"got {self.malloc_tunables!r}")
        if self.num_gpus_per_worker == 0 and self.dtype != "float32":
            raise ConfigError("learner.dtype: CPU training (num_gpus_per_worker=0) supports float32 only")
        check_resources_field("learner.resources_per_worker", self.resources_per_worker)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every training job keeps the same way: its seed, checkpoints, resume and outputs."""

    seed: int = 0
    """Seeds the data order, sampling and the learner."""
    checkpoint_every: int = 5
    """Checkpoint every this many steps (0: only at the end)."""
    storage_path: str = "./checkpoints"
    """Where Ray Train keeps checkpoints: a local directory or a cloud URI (s3://, gs://)."""
    run_name: str = ""
    """Checkpoint folder under storage_path (empty: <algorithm>-<date>-<time>, or the latest one when resuming)."""
    resume: bool = False
    """Continue the run in storage_path/run_name (the latest run when run_name is empty) from its last checkpoint."""
    resume_from: str = ""
    """Start a new run (run_name, or a fresh name) from a chosen complete checkpoint,
    <storage>/<run>/checkpoint_<step>: its weights, optimizer, step counter and data order."""
    output_dir: str = "./outputs"
    """Where the final policy is saved in HF format (adapter and merged model), under <output_dir>/<run_name>."""

    def validate(self) -> None:
        require_at_least("trainer.checkpoint_every", self.checkpoint_every, 0)
        if not self.storage_path:
            raise ConfigError("trainer.storage_path: expected a directory or URI")


@dataclasses.dataclass(frozen=True)
class TrainerConfig(RunConfig):
    """The RL loop: how many steps of how many prompts."""

    total_steps: int = 10
    """RL steps (generate, judge, train, sync) to run, counting steps done before a resume."""
    prompts_per_step: int = 16
    """Prompts per step; the batch is prompts_per_step * sampling.n responses."""
    max_failed_steps: int = 3
    """Steps in a row whose judging left too few samples to train on before the job stops (a judge that is down
    for good), checkpointing the last finished step first."""

    def validate(self) -> None:
        super().validate()
        require_at_least("trainer.total_steps", self.total_steps, 1)
        require_at_least("trainer.prompts_per_step", self.prompts_per_step, 1)
        require_at_least("trainer.max_failed_steps", self.max_failed_steps, 1)


@dataclasses.dataclass(frozen=True)
class OfflineTrainerConfig(RunConfig):
    """Steps and evaluation of a job that trains on a fixed dataset (DPO and its kin)."""

    total_steps: int = 0
    """Optimizer steps to run, counting steps done before a resume (0: algorithm.epochs passes over the training
    examples)."""
    eval_every: int = 10
    """Evaluate on the eval split every this many steps (0: only at the end)."""
    checkpoint_every: int = 10
    """Checkpoint every this many steps (0: only at the end)."""

    def validate(self) -> None:
        super().validate()
        require_at_least("trainer.total_steps", self.total_steps, 0)
        require_at_least("trainer.eval_every", self.eval_every, 0)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


class _Raw(str):
    """A command-line value: parsed as YAML unless the field wants a string."""


class _RawSection(dict):
    """A section created by a command-line override (for error messages that name the right source)."""


def _source_of(value: Any, source: str) -> str:
    return COMMAND_LINE if isinstance(value, (_Raw, _RawSection)) else source


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Build ``cls`` from an optional YAML file and ``key.sub=value`` overrides, then validate it.

    Raises:
        ConfigError: one line naming the file (or "command line"), the key and what was expected.
    """
    data: dict[str, Any] = {}
    source = COMMAND_LINE
    if path is not None:
        source = str(path)
        data = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(data, item)
    config = _build(cls, data, prefix="", source=source)
    validate(config)
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "could not parse"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{COMMAND_LINE}: override '{item}' is not of the form section.key=value")
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):  # an item of a list the file gave (reward.components.0.model=...)
            child = node[_list_index(node, part, ".".join(parts[:i + 1]))]
        else:
            child = node.setdefault(part, _RawSection())
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"{COMMAND_LINE}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    if isinstance(node, list):
        node[_list_index(node, parts[-1], key)] = _Raw(value)
    else:
        node[parts[-1]] = _Raw(value)


def _list_index(items: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"{COMMAND_LINE}: '{key}': expected an index below {len(items)} into the list the config "
                          "gives there")
    return int(part)


def _build(cls: type[T], data: Any, prefix: str, source: str, base: Any = None) -> T:
    """``cls`` from a mapping, on top of ``base`` (default ``cls()``): a job whose defaults differ from a section's
    class defaults keeps them for every key the file or command line does not set."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        src = _source_of(data[unknown[0]], source)
        raise ConfigError(
            f"{src}: unknown key '{prefix}{unknown[0]}' (expected one of: {', '.join(sorted(fields))})"
        )
    hints = typing.get_type_hints(cls)
    base = cls() if base is None else base
    kwargs = {}
    for name, value in data.items():
        src = _source_of(value, source)
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, f"{prefix}{name}.", src, base=getattr(base, name))
        else:
            kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}", src)
    return dataclasses.replace(base, **kwargs)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=key + ".", source=source)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, _Raw) and not _wants_string(tp):
        try:
            value = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"{source}: {key}: could not parse value '{value}'") from None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: expected one of {list(args)}, got {_describe(value)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {_describe(value)}")
        item_type = args[0] if args else Any
        return tuple(_coerce(item_type, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {_describe(value)}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an int, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 5e-05 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a float, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {_describe(value)}")
        return str(value)
    raise TypeError(f"config field {key} has unsupported type {tp!r}")  # a programming error, not user input


def _wants_string(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return str in typing.get_args(tp)
    return False


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        kind, text = "a section", repr(dict(value))
    elif isinstance(value, _Raw):
        kind, text = "str", repr(str(value))
    else:
        kind, text = type(value).__name__, repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) in (tuple, list):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", repr(tp))


def validate(config: Any) -> None:
    """Run every section's ``validate()`` (depth first), then the top level's. Raises ConfigError."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    check = getattr(config, "validate", None)
    if callable(check):
        check()


# --------------------------------------------------------------------------------------------------------------
# Introspection: field docs, dicts for logging, secrets redaction
# --------------------------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (``name: type = default`` then ``\"\"\"doc\"\"\"``)."""
    docs: dict[str, str] = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):  # a subclass's doc wins
        docs.update(_own_field_docs(base))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_config(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """Lines ``key (type, default): doc`` for every leaf field, for ``--help``; defaults are the job's own."""
    defaults = cls() if defaults is None else defaults
    lines = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, default = hints[f.name], getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            lines.extend(describe_config(tp, prefix=f"{prefix}{f.name}.", defaults=default))
            continue
        tname = f"one of {list(typing.get_args(tp))}" if typing.get_origin(tp) is Literal else _type_name(tp)
        lines.append(f"  {prefix}{f.name} ({tname}, default {default!r}): {docs.get(f.name, '')}")
    return lines


_SECRET_KEY = re.compile(r"(^|_)(api_key|key|token|secret|password|passwd|credentials)$", re.IGNORECASE)
REDACTED = "***"


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain YAML-able data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(config)


def redact(data: Any) -> Any:
    """A copy of ``data`` with the value of every secret-looking key (``*_key``, ``token``, ``password``...) hidden,
    and the credentials in every URL (see `redact_url`)."""
    if isinstance(data, dict):
        return {
            k: (REDACTED if _SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v)) for k, v in data.items()
        }
    if isinstance(data, list):
        return [redact(v) for v in data]
    if isinstance(data, str) and "://" in data:
        return redact_url(data)
    return data


def redact_url(url: str) -> str:
    """``url`` with its password (``scheme://user:pass@host``) and secret-looking query values (``?key=...``)
    hidden, for logs and printed messages (e.g. a database URI in MLFLOW_TRACKING_URI)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret_query = any(_SECRET_KEY.search(k) for k, _ in pairs)
    if parts.password is None and not secret_query:
        return url  # as it was (urlunsplit would also rewrite sqlite://// paths)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username}:{REDACTED}@{netloc.rpartition('@')[2]}"
    query = urlencode([(k, REDACTED if _SECRET_KEY.search(k) else v) for k, v in pairs]) if secret_query \
        else parts.query
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------------------------------------------
# Jobs' command line
# --------------------------------------------------------------------------------------------------------------


def parse_job_config(cls: type[T], argv: typing.Sequence[str] | None = None, *, default_config: str | None = None,
                     description: str = "") -> T:
    """``[--config FILE] [section.key=value ...]`` -> a validated config; exits 2 with one line on any error."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(description.strip() + "\n" if description else "", end="")
        print("usage: [--config FILE.yaml] [section.key=value ...]\n\nconfig keys:")
        print("\n".join(describe_config(cls)))
        sys.exit(0)
    path = default_config
    overrides = []
    check_cluster = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "--check-cluster"):
            if i + 1 >= len(args):
                _exit_config_error(ConfigError(f"{COMMAND_LINE}: {arg} needs a file path"))
            if arg == "--config":
                path = args[i + 1]
            else:
                check_cluster = args[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("--check-cluster="):
            check_cluster = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            _exit_config_error(ConfigError(f"{COMMAND_LINE}: unknown option '{arg}' (expected --config FILE, "
                                           "--check-cluster MANIFEST or key=value)"))
        else:
            overrides.append(arg)
        i += 1
    try:
        config = load_config(cls, path, overrides)
    except ConfigError as e:
        _exit_config_error(e)
    if check_cluster is not None:
        _check_cluster(config, check_cluster)
    return config


def _check_cluster(config: Any, manifest: str) -> typing.NoReturn:
    """``--check-cluster MANIFEST``: print whether the KubeRay cluster of ``manifest`` can ever hold the job's
    actors (`rayalign.placement`) and exit, 0 when it can, 2 with one line naming what is missing."""
    from rayalign import placement

    phases = getattr(config, "phases", None)
    if not callable(phases):
        _exit_config_error(ConfigError(f"{COMMAND_LINE}: --check-cluster: this job starts no actors to place"))
    try:
        print("\n".join(placement.check_phases(phases(), placement.manifest_groups(manifest), f"{manifest}")))
    except ConfigError as e:
        print(f"cluster check: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)


def _exit_config_error(error: ConfigError) -> typing.NoReturn:
    print(f"config error: {error}", file=sys.stderr)
    sys.exit(2)
