"""mlip_dist: cluster-scale MLIP pre-training of chest X-ray vision-language models."""

__version__ = "0.1.0"
