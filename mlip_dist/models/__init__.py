"""Image and text encoders, projection heads, MAE decoder and the composed MLIP model."""
