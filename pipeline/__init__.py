"""pipeline: ONNX-centric train-then-deploy transfer learning for image classification.

Stages (each a module with a plain ``run(...)`` function, chained by ``dvc.yaml``):
``prepare`` -> ``features`` -> ``train_head`` -> ``cut_cache`` -> ``finetune`` -> ``export``
-> ``bench``.  Run ``pipeline --help`` for the CLI.
"""

__version__ = "0.1.0"
