"""Reproducing SerialGen's models: the synthetic world, dataset/pair builders, trainers and evaluation."""
