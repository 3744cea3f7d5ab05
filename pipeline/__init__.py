"""pipeline: ONNX-centric train-then-deploy transfer learning for image classification.

Stages (``pipeline.stages``, each a module with a plain ``run(...)`` chained by ``dvc.yaml``):
``prepare`` -> ``features`` -> ``train_head`` -> ``cut_cache`` -> ``finetune`` -> ``export``
-> ``interpret``, ``bench`` -> ``card``. Shared code is in ``pipeline.core``, deployment in
``pipeline.onnx``, research and benchmark commands in ``pipeline.tools``. Run
``pipeline --help`` for the CLI. Installed as the distribution ``onnx-transfer-pipeline``.
"""

DISTRIBUTION = "onnx-transfer-pipeline"
__version__ = "0.1.0"
