"""Data preparation (MIMIC-CXR to shards), synthetic data and the streaming loader."""
