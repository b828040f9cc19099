"""Datasets: catalog of dataset facts, preparation, loading, augmentation and the embedded synthetic set."""
