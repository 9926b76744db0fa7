"""ml_collections configs: ``default`` (offline digits) and its diffs, variants by argument
(``cifar.py:DATASET,MODEL``, ``mnist1d.py:NOISE``, ``digits_noisy.py:NOISE``)."""
