"""Memory: the per-stage profiler, `hydra-rlhf profile`, the estimator and the levers."""
