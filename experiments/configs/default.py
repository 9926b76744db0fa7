"""The offline default: a small CNN on scikit-learn's 8x8 digits, minutes on a CPU.

Every field the trainer reads is here; other configs are diffs of this one.
"""

import ml_collections
from ml_collections import config_dict

from experiments import optimizers


def add_data(config: ml_collections.ConfigDict) -> None:
    """The data fields: the data set, how much of it, label noise, augmentation."""
    # Data: 'digits' (offline), 'cifar10', 'cifar100' (tfds array_record in data_dir).
    config.dataset = "digits"
    config.data_dir = config_dict.placeholder(str)
    config.num_train_examples = config_dict.placeholder(int)  # use only the first N (quick runs)
    config.num_test_examples = config_dict.placeholder(int)
    # Hold out the last N training examples and evaluate on them instead of the test set
    # (the "test_*" metrics are then validation metrics): for choosing hyperparameters.
    config.validation_examples = config_dict.placeholder(int)
    # Symmetric label noise on the training split (test labels stay clean): this fraction of
    # the labels, chosen with its own seed, each replaced by a uniformly drawn wrong class.
    config.label_noise = 0.0
    config.label_noise_seed = 0
    # On device, every step: random crop with zero padding, left-right flip, Cutout (0 = off;
    # 16 is the usual CIFAR size). Digits are 8x8 and not mirror-symmetric.
    config.augment = ml_collections.ConfigDict(dict(crop_padding=1, flip=False, cutout_size=0))


def add_parallel(config: ml_collections.ConfigDict) -> None:
    """Data parallelism, the training state's layout, and m-sharpness's micro-batches."""
    # Data parallelism (experiments/parallel.py): 'none' (one device), 'jit' (jax.jit over a
    # mesh of every device of every process, the batch sharded) or 'pmap'. With several
    # devices, average='gradients' averages every gradient and BatchNorm statistic (the
    # one-device step on the global batch); 'direction' perturbs each device with its own
    # shard and averages only the final direction (per-device "m-sharpness").
    config.parallel = "none"
    # 'gradients', unlike gam_optax's default 'direction' (the released code): a run takes
    # the same steps (up to rounding) on any number of devices, and resumes on any of them.
    config.average = "gradients"
    # Where the training state lives under parallel='jit' with average='gradients':
    # 'replicated' (a copy on each device) or 'fsdp' (each leaf of at least 1024 elements
    # split over the devices along its largest axis they divide; XLA gathers the parameters
    # where the step needs them). Checkpoints hold the whole state: resume under either.
    config.param_sharding = "replicated"
    # m-sharpness (step.micro_batched_direction): micro-batches of m = micro_batch examples
    # per device, each perturbed on its own (0: the whole batch); 'parallel' (jax.vmap) or
    # 'sequential' (jax.lax.map: one micro-batch's memory, slower).
    config.micro_batch = 0
    config.micro_strategy = "parallel"


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    add_data(config)

    # Model: a key of experiments.models.MODELS; model_kwargs set its fields (e.g. widths).
    config.model = "small_cnn"
    config.model_kwargs = ml_collections.ConfigDict()
    # 'float32'; 'bfloat16' computes in bfloat16 (float32 parameters), for GPUs and TPUs;
    # 'float64' (with JAX_ENABLE_X64=1) for exact equivalence checks.
    config.dtype = "float32"

    # Training: the released recipe's shape (SGD + momentum, coupled weight decay, cosine
    # learning rate stepped per epoch down to 0, label smoothing on the wrong classes).
    config.num_epochs = 30
    config.batch_size = 64
    config.eval_batch_size = 512
    # Each epoch is a fresh shuffle cut into N // batch_size steps (the rest is dropped);
    # steps_per_epoch caps that for quick runs.
    config.steps_per_epoch = config_dict.placeholder(int)
    config.learning_rate = 0.1
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.label_smoothing = 0.1

    # Optimizer: a name of experiments/optimizers.py: 'sgd', 'adamw', or a gam_optax
    # transformation ('gam', 'sam', 'gsam', 'sam_gam', 'gam_penalty', 'looksam', 'reuse')
    # placed before the base optimizer, whose keyword arguments are the section of its name
    # (config.gam, ...).
    # 'sgd' is coupled weight decay + SGD with momentum (PyTorch's SGD); 'adamw' decouples it.
    config.optimizer = "gam"
    config.base_optimizer = "sgd"
    optimizers.add_sections(config)  # config.gam: the released CIFAR-100 ResNet setting

    add_parallel(config)

    # Bookkeeping.
    config.log_every_steps = 10  # progress-bar refresh
    config.keep_checkpoints = 3  # the latest N
    # 0: a step that leaves a NaN/inf loss or state stops the run (the last good checkpoint
    # stays). N > 0: skip such steps, up to N in a row (optax.apply_if_finite).
    config.skip_nonfinite_steps = 0
    config.progress_bar = True
    return config


if __name__ == "__main__":
    from experiments import not_a_program

    config = "--config=experiments/configs/default.py"
    not_a_program(__spec__, f"python -m experiments.train {config} --workdir=DIR", "a config")
