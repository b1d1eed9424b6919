"""Experience-making: the Rollout, the stages that fill it, the samplers and the sources (sync, async)."""
