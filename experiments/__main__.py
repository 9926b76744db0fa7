"""``python -m experiments``: the main job, SGD against GAM on MNIST-1D with noisy labels (``experiments.compare``)."""

from experiments.compare import main

if __name__ == "__main__":
    main()
