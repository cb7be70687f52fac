"""Evaluation: parse model answers, score prediction files (accuracy, field checks, BLEU/ROUGE-L/CIDEr), LLM judge."""
