"""The learner: Ray Train workers running DeepSpeed (LoRA or full fine-tuning), driven step by step by the job."""
