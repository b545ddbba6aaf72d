"""Text classification and regression: data and models."""
