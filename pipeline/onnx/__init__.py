"""Deployment: the model contract (metadata table), ONNX conversion and variants, onnxruntime
sessions and providers, and the torch-free runner."""
