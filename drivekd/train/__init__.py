"""Training: typed YAML configs and one accelerate-based loop shared by SFT and distillation."""
