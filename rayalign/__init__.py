"""rayalign: align an LLM to a written policy with AI feedback (RLAIF) on Ray + vLLM + DeepSpeed.

Importing the package is cheap: vLLM, DeepSpeed, Ray and MLflow are imported inside the functions and actors
that use them.
"""

__version__ = "0.1.0"
