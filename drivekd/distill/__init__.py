"""Drive-KD distillation: gradient combination (AGP and baselines), signals, multi-teacher training."""

from drivekd.distill.combine import STRATEGIES, combination_coefficients, combine_gradients, gradient_stats

__all__ = ["STRATEGIES", "combination_coefficients", "combine_gradients", "gradient_stats"]
