"""GPU validation helpers run by ``bench/gpu_check.sh`` (correctness at the real tile configurations)."""
