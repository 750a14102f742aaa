"""Whole-slide segmentation: slide reading, tissue mask, tiled inference, aggregation, outputs."""
