"""Drop-in replacements for other libraries' APIs (``compat.torchrl``: TorchRL's functional value estimators)."""
