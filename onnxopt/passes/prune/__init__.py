"""Structured channel pruning on ONNX graphs (pass ``prune``); see :mod:`onnxopt.passes.prune.pass_`."""
