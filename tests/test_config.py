"""Config loading: YAML + dotted overrides, every rejection path, docs for every field, secrets redaction."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Literal

import pytest

from conftest import ROOT, load_job, run_job
from rayalign import config as C


@dataclasses.dataclass(frozen=True)
class Inner:
    steps: int = 3
    """Steps."""
    lr: float = 1e-5
    """Learning rate."""
    mode: Literal["a", "b"] = "a"
    """Mode."""
    name: str = "x"
    """Name."""
    stop: tuple[str, ...] = ()
    """Stop strings."""
    limit: int | None = None
    """Optional limit."""
    api_key: str = ""
    """A secret."""
    api_key_env: str = "MY_KEY"
    """Name of the env var holding the secret (not itself secret)."""

    def validate(self) -> None:
        if self.steps < 1:
            raise C.ConfigError(f"inner.steps: expected an int >= 1, got {self.steps}")


@dataclasses.dataclass(frozen=True)
class Top:
    inner: Inner = Inner()
    """Inner section."""
    flag: bool = False
    """A flag."""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_yaml_and_overrides(tmp_path):
    assert C.load_config(Top) == Top()
    path = write(tmp_path, 'inner:\n  steps: 5\n  stop: ["\\n\\n"]\nflag: true\n')
    cfg = C.load_config(Top, path, ["inner.lr=0.5", "inner.mode=b", "inner.name=123", "inner.limit=7"])
    assert cfg.inner.steps == 5 and cfg.inner.stop == ("\n\n",) and cfg.flag is True
    assert cfg.inner.lr == 0.5 and cfg.inner.mode == "b"
    assert cfg.inner.name == "123"  # a str field keeps the command-line text as written
    assert cfg.inner.limit == 7
    assert C.load_config(Top, None, ["inner.limit=null"]).inner.limit is None
    assert C.load_config(Top, None, ["inner.lr=3"]).inner.lr == 3.0  # an int is a fine float


@pytest.mark.parametrize(
    "yaml_text, overrides, expected",
    [
        ("inner:\n  stepz: 1\n", [], "c.yaml: unknown key 'inner.stepz' (expected one of:"),
        ("", ["inner.stepz=1"], "command line: unknown key 'inner.stepz'"),
        ("nope: 1\n", [], "c.yaml: unknown key 'nope'"),
        ("inner:\n  steps: many\n", [], "c.yaml: inner.steps: expected an int, got str 'many'"),
        ("", ["inner.steps=many"], "command line: inner.steps: expected an int, got str 'many'"),
        ("inner:\n  steps: 2.5\n", [], "inner.steps: expected an int, got float 2.5"),
        ("inner:\n  steps: true\n", [], "inner.steps: expected an int, got bool True"),
        ("flag: 1\n", [], "c.yaml: flag: expected true or false, got int 1"),
        ("inner:\n  mode: c\n", [], "inner.mode: expected one of ['a', 'b'], got str 'c'"),
        ("inner:\n  stop: abc\n", [], "inner.stop: expected a list, got str 'abc'"),
        ("inner:\n  limit: x\n", [], "inner.limit: expected int or null, got str 'x'"),
        ("inner: 3\n", [], "c.yaml: inner: expected a mapping, got int 3"),
        ("- 1\n- 2\n", [], "c.yaml: expected a mapping of sections at the top level, got list"),
        ("inner:\n  steps: [1\n", [], "c.yaml: invalid YAML at line"),
        ("inner:\n  steps: 0\n", [], "inner.steps: expected an int >= 1, got 0"),
        ("", ["inner.steps"], "override 'inner.steps' is not of the form section.key=value"),
        ("flag: true\n", ["flag.x=1"], "command line: 'flag' is a value, not a section"),
        ("", ["flag.x=1"], "command line: flag: expected true or false, got a section {'x': '1'}"),
    ],
)
def test_rejections_name_file_key_and_expectation(tmp_path, yaml_text, overrides, expected):
    path = write(tmp_path, yaml_text)
    with pytest.raises(C.ConfigError) as info:
        C.load_config(Top, path, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(C.ConfigError, match=r"nope\.yaml: config file not found"):
        C.load_config(Top, tmp_path / "nope.yaml")


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Top().flag = True  # type: ignore[misc]


def test_redaction_hides_secrets_only():
    cfg = C.load_config(Top, None, ["inner.api_key=sk-very-secret"])
    data = C.redact(C.to_dict(cfg))
    assert data["inner"]["api_key"] == C.REDACTED
    assert data["inner"]["api_key_env"] == "MY_KEY"
    assert "sk-very-secret" not in repr(data)
    assert C.redact({"token": "", "max_new_tokens": 5, "password": "p", "x": [{"secret": "s"}]}) == {
        "token": "", "max_new_tokens": 5, "password": C.REDACTED, "x": [{"secret": C.REDACTED}]}


def _all_config_classes():
    job = load_job("sample.py")
    seen, todo = [], [job.SampleConfig, load_job("ppo.py").PPOJobConfig, load_job("dpo.py").DPOJobConfig,
                      load_job("sft.py").SFTJobConfig, load_job("train_reward_model.py").RewardModelJobConfig,
                      C.ModelConfig, C.RayConfig, C.TrackingConfig, C.SamplingConfig, C.EngineConfig, C.LoraConfig]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        todo.extend(t for t in typing.get_type_hints(cls).values() if dataclasses.is_dataclass(t))
    return seen


@pytest.mark.parametrize("cls", _all_config_classes(), ids=lambda c: c.__name__)
def test_every_config_field_has_a_docstring(cls):
    docs = C.field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


@pytest.mark.parametrize("cls", _all_config_classes(), ids=lambda c: c.__name__)
def test_default_configs_validate(cls):
    C.validate(cls())


def test_engine_cross_field_rules():
    with pytest.raises(C.ConfigError, match="tensor_parallel_size=2 needs GPUs"):
        C.load_config(C.EngineConfig, None, ["tensor_parallel_size=2"])
    with pytest.raises(C.ConfigError, match="num_gpus=1.0 is less than engine.tensor_parallel_size=2"):
        C.load_config(C.EngineConfig, None, ["tensor_parallel_size=2", "num_gpus=1"])
    assert C.load_config(C.EngineConfig, None, ["tensor_parallel_size=2", "num_gpus=2"]).num_gpus == 2.0


@pytest.mark.parametrize(
    "args, expected",
    [
        (["trainer.total_steps=4"], "config error: command line: unknown key 'trainer'"),
        (["sampling.max_new_tokens=lots"], "config error: command line: sampling.max_new_tokens: expected an int"),
        (["--config", "missing.yaml"], "config error: missing.yaml: config file not found"),
        (["--bogus"], "config error: command line: unknown option '--bogus'"),
    ],
)
def test_job_exits_2_with_one_line(tmp_path, args, expected):
    result = run_job("sample.py", *args, cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(expected), result.stderr
    assert "Traceback" not in result.stderr


def test_job_help_lists_documented_keys(tmp_path):
    result = run_job("sample.py", "--help", cwd=tmp_path, timeout=60)
    assert result.returncode == 0
    assert "sampling.max_new_tokens (int, default 96): Most tokens generated per response." in result.stdout


def test_shipped_yaml_configs_load():
    job = load_job("sample.py")
    paths = sorted((ROOT / "jobs" / "configs").glob("sample*.yaml"))
    assert paths, "no shipped sample configs"
    for path in paths:
        C.load_config(job.SampleConfig, path)


def test_shipped_ppo_configs_load_and_the_default_matches():
    job = load_job("ppo.py")
    gpu = C.load_config(job.PPOJobConfig, ROOT / "jobs" / "configs" / "ppo_gpu.yaml")
    assert gpu.learner.num_gpus_per_worker == 1 and gpu.reward.judge.engine.tensor_parallel_size == 4
    assert gpu.model.name.endswith("8B-Instruct") and "70B" in gpu.reward.judge.model
    assert C.load_config(job.PPOJobConfig, ROOT / "jobs" / "configs" / "ppo.yaml") == job.PPOJobConfig()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["algorithm.dynamic_sampling=false", "sampling.n=1"], "sampling.n: grpo compares responses to the same prompt"),
        (["algorithm.name=ppo"], "ppo has no prompt groups to drop; set algorithm.dynamic_sampling=false"),
        (["reward.components=[{name: judge, kind: judge, weight: 1.0}]"],
         "algorithm.dynamic_sampling_by: 'lexicon' is neither \"reward\" nor a reward component (judge)"),
        (["algorithm.minibatch_size=6"], "must be a multiple of learner.micro_batch_size"),
        (["sampling.temperature=0"], "training samples need a temperature > 0"),
        (["learner.zero_stage=4"], "learner.zero_stage: expected 0, 1, 2 or 3"),
        (["learner.dtype=bfloat16"], "CPU training (num_gpus_per_worker=0) supports float32 only"),
        (["learner.full_sync=broadcast", "learner.num_gpus_per_worker=1"], "NCCL, which cannot reach CPU engines"),
        (["learner.full_sync=nccl"], "learner.full_sync: expected one of ['shared_memory', 'broadcast']"),
        (["algorithm.kl_in=loss", "algorithm.kl_estimator=k1"], "k1 in the loss has a zero expected gradient"),
        (["algorithm.name=grpo", "sampling.n=2", "algorithm.kl_in=reward"], "use kl_in=loss (its default)"),
        (["lora.dropout=0.1"], "lora.dropout: the PPO ratio compares passes over the same weights"),
        (["lora.rank=12"], "lora.rank: the rollout engines (vLLM) load adapters of rank 1, 8, 16"),
        (["lora.rank=1024"], "lora.rank: the rollout engines (vLLM) load adapters of rank"),
        (["sampling.max_new_tokens=1024"], "leaves no room for the prompt in engine.max_model_len (1024)"),
    ],
)
def test_ppo_cross_field_rules(overrides, expected):
    job = load_job("ppo.py")
    with pytest.raises(C.ConfigError, match=re.escape(expected)):
        C.load_config(job.PPOJobConfig, None, overrides)


def test_dpo_gpu_profile_and_cross_field_rules():
    job = load_job("dpo.py")
    gpu = C.load_config(job.DPOJobConfig, ROOT / "jobs" / "configs" / "dpo_gpu.yaml")
    assert gpu.learner.num_workers * gpu.learner.num_gpus_per_worker == 4 and gpu.algorithm.name == "dpo"
    for overrides, expected in ((["algorithm.minibatch_size=6"], "must be a multiple of learner.micro_batch_size"),
                                (["algorithm.name=ipo", "algorithm.label_smoothing=0.1"], "a form of dpo, not ipo"),
                                (["algorithm.beta=0"], "algorithm.beta: expected a float > 0"),
                                (["data.eval_fraction=1"], "data.eval_fraction: expected a float in [0, 1)"),
                                (["heldout.rule=nope"], "heldout.rule: unknown rule 'nope'")):
        with pytest.raises(C.ConfigError, match=re.escape(expected)):
            C.load_config(job.DPOJobConfig, None, overrides)


def test_sft_and_reward_model_gpu_profiles_and_cross_field_rules():
    sft = load_job("sft.py")
    gpu = C.load_config(sft.SFTJobConfig, ROOT / "jobs" / "configs" / "sft_gpu.yaml")
    assert gpu.learner.num_gpus_per_worker == 1 and gpu.data.packing and gpu.data.max_length == 4096
    rm = load_job("train_reward_model.py")
    gpu = C.load_config(rm.RewardModelJobConfig, ROOT / "jobs" / "configs" / "reward_model_gpu.yaml")
    assert gpu.learner.num_workers == 4 and gpu.algorithm.margin_scale == 1.0
    for cls, overrides, expected in (
            (sft.SFTJobConfig, ["algorithm.minibatch_size=3", "learner.micro_batch_size=2"],
             "must be a multiple of learner.micro_batch_size"),
            (sft.SFTJobConfig, ["data.max_length=4096"], "is over engine.max_model_len (1024)"),
            (rm.RewardModelJobConfig, ["algorithm.margin_scale=-1"], "algorithm.margin_scale: expected a float >= 0"),
            (rm.RewardModelJobConfig, ["validation.limit=0"], "validation.limit")):
        with pytest.raises(C.ConfigError, match=re.escape(expected)):
            C.load_config(cls, None, overrides)


def test_where_the_kl_goes_and_its_estimator_default_per_algorithm():
    job = load_job("ppo.py")
    for overrides, in_loss, estimator in ((["algorithm.name=ppo", "algorithm.dynamic_sampling=false"], False, "k1"),
                                          (["algorithm.name=rloo", "sampling.n=2"], False, "k1"),
                                          (["algorithm.name=rloo", "sampling.n=2", "algorithm.kl_in=loss"], True, "k3"),
                                          (["algorithm.name=grpo", "sampling.n=2"], True, "k3"),
                                          (["algorithm.name=rloo", "algorithm.kl_in=reward",
                                            "algorithm.kl_estimator=k3"], False, "k3")):
        algo = C.load_config(job.PPOJobConfig, None, overrides).algorithm
        assert (algo.kl_in_loss, algo.estimator) == (in_loss, estimator), overrides
    # an adaptive coefficient that starts at 0 stays there: refused rather than a target that never acts
    with pytest.raises(C.ConfigError, match="kl_target needs algorithm.kl_coef > 0"):
        C.load_config(job.PPOJobConfig, None, ["algorithm.kl_coef=0", "algorithm.kl_target=3"])


def test_overrides_keep_the_jobs_own_section_defaults():
    """A job's default section (e.g. ppo's tracking.experiment, reward components) survives an override of
    another key in that section."""
    job = load_job("ppo.py")
    cfg = C.load_config(job.PPOJobConfig, None, ["tracking.sample_every=1", "reward.judge.mode=logprob",
                                                "ray.namespace=x"])
    assert cfg.tracking.experiment == "rayalign-ppo" and cfg.tracking.sample_every == 1
    assert [c.name for c in cfg.reward.components] == ["judge", "lexicon"] and cfg.reward.judge.mode == "logprob"
    assert cfg.ray.num_cpus == 8 and cfg.ray.namespace == "x"


def test_exponent_floats_without_a_dot():
    job = load_job("ppo.py")
    assert C.load_config(job.PPOJobConfig, None, ["learner.lr=5e-05"]).learner.lr == 5e-05
    with pytest.raises(C.ConfigError, match="expected a float"):
        C.load_config(job.PPOJobConfig, None, ["learner.lr=fast"])


def test_urls_lose_their_credentials_in_logs():
    assert C.redact_url("postgresql://mlflow:s3cret@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    assert C.redact_url("https://judge.example/v1?api_key=abc&x=1") == "https://judge.example/v1?api_key=%2A%2A%2A&x=1"
    assert C.redact_url("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert C.redact({"judge": {"url": "http://u:p@h/v1", "api_key_env": "JUDGE_KEY"}, "n": 3}) == {
        "judge": {"url": "http://u:***@h/v1", "api_key_env": "JUDGE_KEY"}, "n": 3}


def test_an_override_reaches_an_item_of_a_list_the_file_gives():
    job = load_job("ppo.py")
    profile = ROOT / "jobs" / "configs" / "ppo_reward_model.yaml"
    cfg = C.load_config(job.PPOJobConfig, profile, ["reward.components.0.model=/models/rm"])
    assert [(c.kind, c.model) for c in cfg.reward.components] == [("reward_model", "/models/rm"), ("rule", "")]
    with pytest.raises(C.ConfigError, match=re.escape("'reward.components.2': expected an index below 2")):
        C.load_config(job.PPOJobConfig, profile, ["reward.components.2.model=/models/rm"])


def test_learner_malloc_tunables_reach_the_workers_env(monkeypatch):
    from rayalign.learner.group import _worker_env

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    default = C.LearnerConfig()
    default.validate()
    assert _worker_env(default) == {"env_vars": {"GLIBC_TUNABLES": C.LEARNER_MALLOC_TUNABLES}}
    assert _worker_env(C.LearnerConfig(malloc_tunables="")) == {}  # glibc's own behaviour
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.x86_ibt=off")  # the job's own come first, ours after
    assert _worker_env(default)["env_vars"]["GLIBC_TUNABLES"] == "glibc.cpu.x86_ibt=off:" + C.LEARNER_MALLOC_TUNABLES
    for bad in ("arena_max=1", "glibc.malloc.arena_max", "glibc.malloc.arena_max=1::"):
        with pytest.raises(C.ConfigError, match="learner.malloc_tunables: expected glibc.<name>=<value>"):
            C.LearnerConfig(malloc_tunables=bad).validate()
