"""maskformer: MaskFormer for semantic and panoptic segmentation (Cheng et al., NeurIPS 2021).

Importing this package is cheap on purpose (no torch), so `maskformer --help` is instant.
"""

__version__ = "0.1.0"
