"""The network of the paper's Fig. 2: backbone -> pixel decoder -> transformer decoder -> segmentation module."""
