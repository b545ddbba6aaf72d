"""Image classification: data, augmentation, baseline architectures and models."""
