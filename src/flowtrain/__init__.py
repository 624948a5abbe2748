"""flowtrain: train GPT-style language models and make their gradient flow visible and controlled."""

__version__ = "0.1.0"
