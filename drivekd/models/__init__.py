"""VLM backends: one narrow interface over HF transformers models, one file per family."""
