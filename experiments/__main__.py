"""``python -m experiments``: the main job, SGD against GAM (``experiments.compare``)."""

from experiments.compare import main

if __name__ == "__main__":
    main()
