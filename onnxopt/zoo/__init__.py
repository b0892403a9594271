"""The example zoo: small torch image classifiers and their ONNX export (:mod:`onnxopt.zoo.nets`).

The nets are what the shipped example model (``examples/build_default_model.py``), the benchmarks and the tests
export. :mod:`onnxopt.zoo.nets` imports torch at module level; this package itself does not, so importing
``onnxopt.zoo`` stays cheap and torch remains optional for onnxopt.
"""
