"""What every job does before its real work, written once: read the prompts, resolve the model, drop the prompts
too long for the engines, join Ray and check that the job's actors fit on it.

Bad input ends a job before anything heavy starts, with one line on stderr and exit code 2: a job wraps its
start-up in ``try: ... except INPUT_ERRORS as e: return refuse(e)``. A local Ray too small for the job's actors
(they would wait for it forever) is a config error, printed like a bad command line: ``refuse(e, "config error")``.

    inputs = load_job_inputs(cfg.model.name, cfg.data, prompt_token_budget(cfg.engine, cfg.sampling))
    address = start_ray(cfg.ray, cfg.phases())

Light to import: transformers and Ray are imported inside the functions that use them.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from rayalign.config import ConfigError, DataConfig, EngineConfig, RayConfig, SamplingConfig
from rayalign.data.prompts import DatasetError, PromptSet, drop_overlong_prompts, load_prompts
from rayalign.judge.rubric import RubricError
from rayalign.models import ModelNotFoundError, ModelSpecError, resolve_base
from rayalign.placement import Phase

INPUT_ERRORS: tuple[type[Exception], ...] = (ConfigError, DatasetError, ModelNotFoundError, ModelSpecError,
                                             RubricError)
"""What a user's input can be refused with at start-up; each says what is wrong in one line."""


@dataclasses.dataclass(frozen=True)
class JobInputs:
    model_path: str
    """What engines and learners load: a local HF directory or a hub id (`rayalign.models.resolve_base`)."""
    prompts: PromptSet | None
    """The prompts, without those too long for the engines (counted in ``skipped``); None for a job without."""


def refuse(error: BaseException | str, prefix: str = "error") -> int:
    """Print ``<prefix>: <error>`` as the job's one line on stderr; returns 2, the exit code ``main`` returns."""
    from rayalign.console import terminal_err

    print(f"{prefix}: {error}", file=terminal_err())
    return 2


def prompt_token_budget(engine: EngineConfig, sampling: SamplingConfig) -> int:
    """The longest chat-templated prompt, in tokens, that still leaves room for a whole response."""
    return engine.max_model_len - sampling.max_new_tokens


def load_job_inputs(model_name: str, data: DataConfig | None, max_prompt_tokens: int | None) -> JobInputs:
    """Resolve ``model_name`` and read ``data``'s prompts, dropping those longer than ``max_prompt_tokens`` with
    the model's chat template (vLLM would refuse the whole batch that held one; None keeps them all). Raises one
    of `INPUT_ERRORS`. Without ``data`` no prompts are read and no tokenizer is loaded."""
    prompts = None if data is None else load_prompts(data.prompts, limit=data.limit)
    model_path = resolve_base(model_name)
    if prompts is not None and max_prompt_tokens is not None:
        from transformers import AutoTokenizer

        prompts = drop_overlong_prompts(prompts, AutoTokenizer.from_pretrained(model_path), max_prompt_tokens)
    return JobInputs(model_path, prompts)


def start_ray(config: RayConfig, phases: Sequence[Phase] = ()) -> str:
    """Join or start Ray (`rayalign.resources.init_ray`) and return its address, once it can hold each of the
    job's ``phases`` (`rayalign.placement`): a local Ray or a fixed-size cluster that cannot is refused at once, an
    autoscaling one after ``config.resource_wait_s``; either way Ray is shut down again and ConfigError raised with
    one line naming what is missing, since the actors would otherwise wait for resources forever."""
    from rayalign.placement import check_live
    from rayalign.resources import init_ray

    address = init_ray(config)
    if phases:
        try:
            check_live(phases, wait_s=config.resource_wait_s, local=address == "local")
        except ConfigError:
            import ray

            ray.shutdown()
            raise
    return address
