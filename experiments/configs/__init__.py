"""ml_collections configs: ``default`` (offline digits) and the published CIFAR recipes."""
