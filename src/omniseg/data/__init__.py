"""Data: synthetic cohort and slides, sample sheets, splits, patch extraction, HDF5 patch sets."""
