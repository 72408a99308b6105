"""Sample the policy on prompts with vLLM engines on Ray, and log what it says to MLflow.

A quick look at a model before (or after) aligning it: resolves the model (the embedded SmolLM2 by default,
converted once to the cache), starts ``engine.num_engines`` vLLM engine actors on a local Ray (or the cluster in
$RAY_ADDRESS), generates one response per prompt, and logs the samples table, response lengths and tokens/s.

    python jobs/sample.py                                     # embedded SmolLM2, 16 held-out vegetarian prompts
    python jobs/sample.py data.limit=4 sampling.temperature=0
    python jobs/sample.py --config jobs/configs/sample.yaml model.name=/path/to/hf_dir
    ray job submit --working-dir . -- python jobs/sample.py
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rayalign import config as C  # noqa: E402


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    model: C.ModelConfig = C.ModelConfig()
    """The model to sample."""
    engine: C.EngineConfig = C.EngineConfig()
    """vLLM engines."""
    sampling: C.SamplingConfig = C.SamplingConfig(temperature=0.7, max_new_tokens=96)
    """How responses are sampled."""
    data: C.DataConfig = C.DataConfig(prompts="builtin:vegetarian/holdout", limit=16)
    """Which prompts."""
    ray: C.RayConfig = C.RayConfig()
    """Which Ray."""
    tracking: C.TrackingConfig = C.TrackingConfig(experiment="rayalign-sample")
    """Where results go."""

    def phases(self) -> list:
        """What runs at once (`rayalign.placement`)."""
        from rayalign import placement as P

        return [P.Phase("sampling", tuple(P.engines(self.engine)))]


def main(argv: list[str] | None = None) -> int:
    cfg = C.parse_job_config(SampleConfig, argv, description=__doc__ or "")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from rayalign.job import INPUT_ERRORS, load_job_inputs, prompt_token_budget, refuse, start_ray

    try:
        inputs = load_job_inputs(cfg.model.name, cfg.data, prompt_token_budget(cfg.engine, cfg.sampling))
    except INPUT_ERRORS as e:
        return refuse(e)

    import ray

    from rayalign.rollout.group import RolloutGroup
    from rayalign.tracking import Tracker

    try:
        address = start_ray(cfg.ray, cfg.phases())
    except C.ConfigError as e:
        return refuse(e, "config error")
    prompts = inputs.prompts
    with Tracker(cfg.tracking.experiment, run_name=cfg.tracking.run_name, config=cfg,
                 tags={"job": "sample", "ray_address": address}) as tracker:
        t0 = time.perf_counter()
        engines = RolloutGroup(inputs.model_path, cfg.model, cfg.engine)
        start_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        rollouts = engines.generate(prompts.prompts, cfg.sampling)
        generate_s = time.perf_counter() - t0
        engines.shutdown()

        lengths = [len(r.response_token_ids) for r in rollouts]
        metrics = {
            "engine_start_seconds": start_s,
            "generate_seconds": generate_s,
            "output_tokens_per_second": sum(lengths) / generate_s,
            "response_tokens_mean": statistics.fmean(lengths),
            "num_samples": len(rollouts),
            "data/skipped_rows": prompts.skipped,
        }
        tracker.log_metrics(metrics, step=0)
        tracker.log_table(
            [{"prompt": r.prompt, "response": r.response, "tokens": len(r.response_token_ids),
              "finish_reason": r.finish_reason, "engine": r.engine_id} for r in rollouts],
            "samples.json",
        )
        for r in rollouts[:3]:
            print(f"\n>>> {r.prompt}\n{r.response.strip()}")
        print(
            f"\n{len(rollouts)} samples from {cfg.model.name} on {cfg.engine.num_engines} engine(s): "
            f"{metrics['output_tokens_per_second']:.1f} output tokens/s, {metrics['response_tokens_mean']:.1f} tokens "
            f"per response. MLflow run {tracker.run_id} at {C.redact_url(tracker.uri)}"
        )
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
