"""drivekd: multi-teacher knowledge distillation (Drive-KD) for driving vision-language models."""

__version__ = "0.1.0"
