"""The pipeline's stages as plain functions: built-in model and data names, evaluation, fine-tuning,
latency, the report, the out-of-memory safeguard, step checkpoints for resume, the demo model.
"""
