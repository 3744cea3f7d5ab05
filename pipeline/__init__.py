"""pipeline: ONNX-centric train-then-deploy transfer learning for image classification.

Stages (``pipeline.stages``, each a module with a plain ``run(...)`` chained by ``dvc.yaml``):
``prepare`` -> ``features`` -> ``train_head`` -> ``cut_cache`` -> ``finetune`` -> ``export``
-> ``interpret``, ``bench`` -> ``card``. Shared code is in ``pipeline.core``, deployment in
``pipeline.onnx``, research and benchmark commands in ``pipeline.tools``. Run
``pipeline --help`` for the CLI. Installed as the distribution ``onnx-transfer-pipeline``.
"""

import os as _os

# MKL's sums otherwise depend on its thread count, which it lowers by itself on a busy machine
# (MKL_DYNAMIC): the same head training gave other bytes on 1 and 2 threads. Strict CNR mode
# makes them one result (Intel MKL "conditional numerical reproducibility"); it must be set
# before MKL starts, hence here, before anything imports torch.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

DISTRIBUTION = "onnx-transfer-pipeline"
__version__ = "0.1.0"
