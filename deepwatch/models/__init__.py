"""Models: torch networks, the training template, stacking, and the Detector."""

MODEL_KINDS = ("mlp", "resnet", "snn", "stack", "autoencoder", "hybrid")

__all__ = ["MODEL_KINDS"]
