"""omniseg: Omni-Seg multi-tissue kidney pathology segmentation from partially labelled data."""

__version__ = "0.1.0"
