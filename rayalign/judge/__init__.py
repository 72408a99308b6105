"""The judge: LLM-as-a-judge rewards (vLLM on Ray Serve or any OpenAI-compatible endpoint), rule rewards,
composites of them, and the scoring maths that turns a judge's answer into a reward."""
