"""Deployable forms of a checkpoint: ONNX export (``kprune export``) and ONNX Runtime timing."""
