"""Rollout: vLLM engines that sample responses (with logprobs and the policy version that produced them)."""
