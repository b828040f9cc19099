"""maskformer: MaskFormer for semantic and panoptic segmentation (Cheng et al., NeurIPS 2021).

Importing this package is cheap on purpose (no torch), so `maskformer --help` is instant.
"""

import os

__version__ = "0.1.0"

# OpenMP threads that spin while waiting make CPU runs 10-40x slower as soon as another process (a data
# loader worker, a second test worker, a second rank) shares the cores. Passive waiting costs little when
# the machine is idle. Only a default: it must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
