"""flowtrain: train GPT-style language models and make their gradient flow visible and controlled."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `flowtrain.watch` without importing torch for `import flowtrain` (the CLI reads __version__ first)
    if name == "watch":
        from flowtrain.integrations.watch import watch

        return watch
    raise AttributeError(f"module 'flowtrain' has no attribute {name!r}")
