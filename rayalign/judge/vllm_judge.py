"""The judge model on vLLM: a core that scores batches, and a Ray Serve deployment with request batching.

`JudgeCore` holds one vLLM engine and judges a list of (prompt, response) pairs in one engine call. The Serve
deployment `JudgeDeployment` wraps it: ``judge`` takes one pair and Serve gathers concurrent requests into
batches of up to ``max_batch_size`` (``judge_unbatched`` takes the same request without batching, for
comparison); ``judge_many`` takes a whole list in one request (what the training driver uses); ``judge_row`` is
``judge`` as a stream of one reply, the form `ray.data.llm`'s ServeDeploymentProcessorConfig calls; ``compare_many``
takes a list of (prompt, first, second) and says which response is better, from P("A") vs P("B") of the first
answer token (pairwise evaluation, `rayalign.judge.pairwise`).
"""

from __future__ import annotations

import time
import logging
from typing import Any, AsyncIterator, Sequence

from rayalign.config import JudgeConfig
from rayalign.judge.pairwise import Choice, choice_from_logprobs, pairwise_messages
from rayalign.judge.rubric import SCORE_PREFIX, Rubric, load_rubric, p_yes, parse_score, rubric_path
from rayalign.judge.scoring import score_to_reward
from rayalign.rollout.engine import vllm_kwargs
from rayalign.types import Judgement

log = logging.getLogger(__name__)


class JudgeCore:
    """One vLLM engine running a rubric. Not a Ray actor itself: hosted by a Serve replica (or used directly)."""

    def __init__(self, model_path: str, config: JudgeConfig):
        from vllm import LLM

        self.config = config
        self.rubric: Rubric = load_rubric(rubric_path(config.rubric))
        # logprobs after the yes/no restriction: already normalised over the two answers
        self.llm = LLM(**vllm_kwargs(model_path, config.dtype, config.engine, logprobs_mode="processed_logprobs"))
        self.tokenizer = self.llm.get_tokenizer()
        self._answer_ids = self._single_token_ids([self.rubric.yes, self.rubric.no])
        self._choice_ids = self._single_token_ids(["A", "B"])

    def _single_token_ids(self, words: Sequence[str]) -> list[int]:
        ids = set()
        for word in words:
            for variant in (word, " " + word, word.capitalize(), " " + word.capitalize()):
                tokens = self.tokenizer.encode(variant, add_special_tokens=False)
                if len(tokens) == 1:
                    ids.add(tokens[0])
        if not ids:
            raise ValueError(f"none of {list(words)} is a single token for this judge's tokenizer")
        return sorted(ids)

    def _prompt(self, prompt: str, response: str) -> str:
        messages = self.rubric.messages(prompt, response, self.config.mode)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # Score mode pre-fills the answer's start so that the number is the first thing the judge writes.
        return text + SCORE_PREFIX if self.config.mode == "score" else text

    def judge(self, items: Sequence[tuple[str, str]]) -> list[Judgement]:
        """Judge pairs in one engine call; a pair whose answer cannot be read gets a Judgement with score None."""
        from vllm import SamplingParams

        if not items:
            return []
        prompts = [self._prompt(p, r) for p, r in items]
        if self.config.mode == "score":
            params = SamplingParams(temperature=0.0, max_tokens=6)
        else:
            params = SamplingParams(temperature=1.0, max_tokens=1, logprobs=len(self._answer_ids),
                                    allowed_token_ids=self._answer_ids)
        # vLLM refuses a whole call that holds one prompt longer than the engine's context: fail only those
        limit = self.llm.llm_engine.model_config.max_model_len - params.max_tokens
        fits = [len(self.tokenizer.encode(p)) <= limit for p in prompts]
        outputs = iter(self.llm.generate([p for p, ok in zip(prompts, fits) if ok], params, use_tqdm=False)
                       if any(fits) else [])
        too_long = Judgement(None, None, error=f"rubric + prompt + response longer than the judge's context "
                                               f"({limit} tokens)")
        return [self._read(next(outputs).outputs[0]) if ok else too_long for ok in fits]

    def compare(self, items: Sequence[tuple[str, str, str]]) -> list[Choice | None]:
        """For each (prompt, first, second): "A" when the judge prefers the first response, else "B", by the
        first answer token restricted to A/B (P(A) vs P(B), steadier than a sampled letter for a small judge)."""
        from vllm import SamplingParams

        if not items:
            return []
        prompts = [self.tokenizer.apply_chat_template(pairwise_messages(self.rubric, p, a, b),
                                                      add_generation_prompt=True, tokenize=False)
                   for p, a, b in items]
        params = SamplingParams(temperature=1.0, max_tokens=1, logprobs=len(self._choice_ids),
                                allowed_token_ids=self._choice_ids)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        choices = []
        for out in outputs:
            step = (out.outputs[0].logprobs or [{}])[0]
            choices.append(choice_from_logprobs({lp.decoded_token or "": lp.logprob for lp in step.values()}))
        return choices

    def _read(self, sample: Any) -> Judgement:
        if self.config.mode == "score":
            score = parse_score(sample.text)
            raw = sample.text
        else:
            step = (sample.logprobs or [{}])[0]
            by_token = {lp.decoded_token or "": lp.logprob for lp in step.values()}
            score = p_yes(by_token, self.rubric.yes, self.rubric.no)
            raw = " ".join(f"{t!r}:{lp:.3f}" for t, lp in by_token.items())
        if score is None:
            return Judgement(None, None, raw=raw, error="unparsable judge answer")
        reward = score_to_reward(score, self.config.transform, (self.config.clamp[0], self.config.clamp[1]))
        return Judgement(score, reward, raw=raw)


def judge_deployment(model_path: str, config: JudgeConfig) -> Any:
    """A bound Serve application hosting `JudgeCore` replicas, with batching and (optional) autoscaling."""
    from ray import serve

    from rayalign.resources import judge_replica_options

    @serve.deployment(name="rayalign-judge", max_ongoing_requests=max(64, 2 * config.max_batch_size))
    class JudgeDeployment:
        def __init__(self) -> None:
            self.core = JudgeCore(model_path, config)
            # one judgement before the replica reports RUNNING: on a fresh machine the engine's first forward
            # compiles its kernels for minutes, which belongs to the judge's start (judge.start_timeout_s), not
            # to the first training step's request (judge.timeout_s)
            self.core.judge([("What can I cook tonight?", "A lentil soup.")])

        @serve.batch(max_batch_size=config.max_batch_size, batch_wait_timeout_s=config.batch_wait_timeout_s)
        async def judge(self, items: list[tuple[str, str]]) -> list[Judgement]:
            return self.core.judge(items)

        async def judge_unbatched(self, item: tuple[str, str]) -> Judgement:
            return self.core.judge([item])[0]

        async def judge_many(self, items: list[tuple[str, str]]) -> list[Judgement]:
            return self.core.judge(items)

        async def compare_many(self, items: list[tuple[str, str, str]]) -> list[Choice | None]:
            return self.core.compare(items)

        async def judge_row(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
            """One row of a Ray Data pipeline (`ray.data.llm`'s Serve stage streams its calls): batched with
            every other request in flight, answered as plain columns."""
            j = await self.judge((request["prompt"], request["response"]))
            yield {"score": j.score, "reward": j.reward, "raw": j.raw, "error": j.error or ""}

    options: dict[str, Any] = {"ray_actor_options": judge_replica_options(config)}
    if config.max_replicas > config.num_replicas:
        options["autoscaling_config"] = {"min_replicas": config.num_replicas, "max_replicas": config.max_replicas,
                                         "target_ongoing_requests": config.max_batch_size}
    else:
        options["num_replicas"] = config.num_replicas
    return JudgeDeployment.options(**options).bind()


class ServeJudge:
    """Driver-side client of the judge deployment: judges lists, never turns a failure into a score.

    ``wait=False`` deploys and returns at once, so the judge's engine loads while the caller starts other
    things; the first ``judge`` / ``compare`` (or ``wait_until_running``) then waits for it."""

    def __init__(self, model_path: str, config: JudgeConfig, app_name: str = "rayalign-judge", wait: bool = True):
        from ray import serve

        self.config = config
        self.app_name = app_name
        self._deployed_at = time.perf_counter()
        self.start_seconds: float | None = None  # set once the deployment runs
        (self.handle,) = serve.run_many(
            [serve.RunTarget(judge_deployment(model_path, config), name=app_name, route_prefix=None)],
            wait_for_applications_running=False)
        if wait:
            self.wait_until_running()

    def wait_until_running(self) -> float:
        """Block until the deployment runs; returns the seconds its start took. A failed deploy, or one not
        running within ``judge.start_timeout_s``, raises JudgeUnavailableError naming the deployment."""
        from ray import serve

        from rayalign.judge.openai_judge import JudgeUnavailableError

        while self.start_seconds is None:
            app = serve.status().applications.get(self.app_name)
            status = str(getattr(app.status, "value", app.status)) if app else "missing"
            waited = time.perf_counter() - self._deployed_at
            if status == "RUNNING":
                self.start_seconds = waited
            elif status in ("DEPLOY_FAILED", "missing"):
                why = (app.message if app else "").strip().splitlines()
                raise JudgeUnavailableError(f"the judge deployment '{self.app_name}' did not start ({status}"
                                            f"{': ' + why[0] if why else ''})", partial=[])
            elif waited > self.config.start_timeout_s:
                raise JudgeUnavailableError(f"the judge deployment '{self.app_name}' is not running after "
                                            f"{waited:.0f} s (judge.start_timeout_s; status {status})", partial=[])
            else:
                time.sleep(0.5)
        return self.start_seconds

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Judgement]:
        """One request for the whole list (the replica judges it in one engine call)."""
        self.wait_until_running()
        try:
            return self.handle.judge_many.remote(list(zip(prompts, responses))).result(
                timeout_s=self.config.timeout_s * max(1, len(prompts) / self.config.max_batch_size))
        except Exception as e:  # the replica died or timed out: every pair failed, none scored 0
            error = f"judge request failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return [Judgement(None, None, error=error) for _ in prompts]

    def compare(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> list[Choice | None]:
        """Pairwise comparisons in one request (the batched form `pairwise.win_rate` takes); a failed request
        is None for every pair (counted as failed comparisons, never as a choice)."""
        self.wait_until_running()
        try:
            return self.handle.compare_many.remote(list(zip(prompts, firsts, seconds))).result(
                timeout_s=self.config.timeout_s * max(1, len(prompts) / self.config.max_batch_size))
        except Exception as e:
            log.warning("pairwise judge request failed: %s: %s", type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
            return [None] * len(prompts)

    def shutdown(self) -> None:
        from ray import serve

        serve.delete(self.app_name)
