"""pipeline: ONNX-centric train-then-deploy transfer learning for image classification.

Stages (``pipeline.stages``, each a module with a plain ``run(...)`` chained by ``dvc.yaml``):
``prepare`` -> (``auto``) -> ``features`` -> ``train_head`` -> ``cut_cache`` -> ``finetune`` -> ``export``
-> ``interpret``, ``bench`` -> ``card``. Shared code is in ``pipeline.core``, deployment in
``pipeline.onnx``, research and benchmark commands in ``pipeline.tools``. Run
``pipeline --help`` for the CLI. Installed as the distribution ``onnx-transfer-pipeline``.
"""

import os as _os

# Intel's OpenMP may lower MKL's thread count by itself on a busy machine (dynamic
# adjustment), and MKL's sums depend on the thread count: the same head training gave other
# bytes on 1 and 2 threads. Fixed, the count is what the stage sets (``threads``). It must be
# set before MKL starts, hence here, before anything imports torch.
_os.environ.setdefault("MKL_DYNAMIC", "FALSE")

DISTRIBUTION = "onnx-transfer-pipeline"
__version__ = "0.1.0"
