"""gxpo-kernels: fused kernels and update rules for GRPO-family RL of language models."""
__version__ = "0.1.0"
