"""Hyperparameter sweeps: an Optuna study over the config keys of a training command (`lmforge sweep`)."""
