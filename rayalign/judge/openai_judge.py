"""A judge behind any OpenAI-compatible chat endpoint (Ray Serve LLM, a vLLM server, hosted model APIs).

Timeouts, bounded retries with exponential backoff (timeouts, 5xx, 429, connection errors), and a circuit
breaker: after ``breaker_failures`` requests in a row have failed (each after its retries), the endpoint is
taken for down and `JudgeUnavailableError` stops the caller, carrying every judgement already made. A request
that fails or returns an answer that cannot be read is a Judgement with score None -- never a 0. ``compare``
asks the same endpoint which of two responses is better (pairwise evaluation, `rayalign.judge.pairwise`).
The API key is read from the environment variable named in the config and sent only in the request header.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from rayalign.config import JudgeConfig
from rayalign.judge.pairwise import Choice, pairwise_messages, parse_choice
from rayalign.judge.rubric import SCORE_PREFIX, Rubric, load_rubric, p_yes, parse_score, rubric_path
from rayalign.judge.scoring import score_to_reward
from rayalign.types import Judgement


class JudgeUnavailableError(RuntimeError):
    """The judge endpoint kept failing. ``partial`` holds the judgements made before it went down (None where
    a pair was not judged)."""

    def __init__(self, message: str, partial: list[Judgement | None]):
        super().__init__(message)
        self.partial = partial


class _Retryable(Exception):
    pass


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; any success closes it again."""

    def __init__(self, threshold: int):
        self.threshold = threshold
        self.failures = 0
        self.last_error = ""
        self._lock = threading.Lock()

    def record(self, ok: bool, error: str = "") -> None:
        with self._lock:
            self.failures = 0 if ok else self.failures + 1
            if not ok:
                self.last_error = error

    @property
    def open(self) -> bool:
        return self.failures >= self.threshold


class OpenAIJudge:
    def __init__(self, config: JudgeConfig, rubric: Rubric | None = None):
        self.config = config
        self.rubric = rubric or load_rubric(rubric_path(config.rubric))
        self.url = config.url.rstrip("/") + "/chat/completions"
        self._key = None
        if config.api_key_env:
            self._key = os.environ.get(config.api_key_env)
            if not self._key:
                raise ValueError(f"judge.api_key_env names ${config.api_key_env}, which is not set")
        self.breaker = CircuitBreaker(config.breaker_failures)

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as e:
            if e.code >= 500 or e.code == 429:
                raise _Retryable(f"HTTP {e.code}") from None
            raise ValueError(f"HTTP {e.code}: {e.read()[:200].decode(errors='replace')}") from None
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise _Retryable(f"{type(reason).__name__}: {reason}") from None

    def _body(self, prompt: str, response: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.config.endpoint_model, "temperature": 0.0,
                                "messages": self.rubric.messages(prompt, response, self.config.mode)}
        if self.config.mode == "score":
            body["max_tokens"] = 12
        else:
            body.update(max_tokens=1, logprobs=True, top_logprobs=20)
        return body

    def _read(self, reply: dict[str, Any]) -> Judgement:
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] or ""
            if not isinstance(text, str):
                raise TypeError(type(text).__name__)
        except (KeyError, IndexError, TypeError):
            return Judgement(None, None, raw=str(reply)[:200], error="malformed endpoint reply")
        if self.config.mode == "score":
            answer = text.strip()
            if answer.lower().startswith(SCORE_PREFIX.lower()):
                answer = answer[len(SCORE_PREFIX):]
            score = parse_score(answer)
        else:
            try:
                top = choice["logprobs"]["content"][0]["top_logprobs"]
                score = p_yes({t["token"]: t["logprob"] for t in top}, self.rubric.yes, self.rubric.no)
            except (KeyError, IndexError, TypeError):
                return Judgement(None, None, raw=text, error="endpoint returned no logprobs")
        if score is None:
            return Judgement(None, None, raw=text, error="unparsable judge answer")
        clamp = (self.config.clamp[0], self.config.clamp[1])
        return Judgement(score, score_to_reward(score, self.config.transform, clamp), raw=text)

    def _call(self, body: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        """POST ``body`` with retries and backoff: ``(reply, "")``, or ``(None, error)`` once retries are spent.
        Raises JudgeUnavailableError when the breaker is already open."""
        if self.breaker.open:
            raise JudgeUnavailableError(self._down_message(), [])
        delay = self.config.backoff_s
        error = ""
        for attempt in range(self.config.max_retries + 1):
            try:
                reply = self._post(body)
                self.breaker.record(True)
                return reply, ""
            except _Retryable as e:
                error = str(e)
                if attempt < self.config.max_retries:
                    time.sleep(delay)
                    delay *= 2
            except ValueError as e:  # a 4xx: retrying will not help
                error = str(e)
                break
        self.breaker.record(False, error)
        return None, error

    def judge_one(self, prompt: str, response: str) -> Judgement:
        reply, error = self._call(self._body(prompt, response))
        if reply is None:
            return Judgement(None, None, error=f"judge endpoint failed: {error}")
        try:
            return self._read(reply)
        except Exception as e:  # a reply shaped as no check in _read foresaw: this sample fails, the run goes on
            return Judgement(None, None, raw=str(reply)[:200], error=f"unreadable endpoint reply ({type(e).__name__})")

    def compare_one(self, prompt: str, first: str, second: str) -> Choice | None:
        """Which response better meets the rubric, "A" (first) or "B"; None when the request failed or the reply
        does not start with a clear choice."""
        body = {"model": self.config.endpoint_model, "temperature": 0.0, "max_tokens": 8,
                "messages": pairwise_messages(self.rubric, prompt, first, second)}
        reply, _ = self._call(body)
        if reply is None:
            return None
        try:
            text = reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            return None
        return parse_choice(text) if isinstance(text, str) else None

    def _down_message(self) -> str:
        return (f"judge endpoint {self.url} failed {self.breaker.failures} requests in a row "
                f"(each after {self.config.max_retries} retries); last error: {self.breaker.last_error}")

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Judgement]:
        results: list[Judgement | None] = [None] * len(prompts)

        def work(i: int) -> None:
            results[i] = self.judge_one(prompts[i], responses[i])

        with ThreadPoolExecutor(self.config.concurrency) as pool:
            futures = [pool.submit(work, i) for i in range(len(prompts))]
            for f in futures:
                try:
                    f.result()
                except JudgeUnavailableError:
                    pass
        # requests refused while the breaker was open; a later success may have closed it again
        unsent = Judgement(None, None, error="not sent: the endpoint was failing (circuit breaker open)")
        filled = [r if r is not None else unsent for r in results]
        if self.breaker.open:
            raise JudgeUnavailableError(self._down_message(), filled)
        return filled

    def compare(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> list[Choice | None]:
        """Pairwise comparisons, ``concurrency`` requests in flight (the batched form `pairwise.win_rate` takes)."""
        results: list[Choice | None] = [None] * len(prompts)

        def work(i: int) -> None:
            results[i] = self.compare_one(prompts[i], firsts[i], seconds[i])

        with ThreadPoolExecutor(self.config.concurrency) as pool:
            for f in [pool.submit(work, i) for i in range(len(prompts))]:
                try:
                    f.result()
                except JudgeUnavailableError:
                    pass
        if self.breaker.open:
            raise JudgeUnavailableError(self._down_message(), [])
        return results

    def shutdown(self) -> None:
        pass
