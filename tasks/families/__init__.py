"""Model families: each module has `FAMILY`, `named_tasks()` and `sample(seed, split)`."""
from . import autoencoder, cnn, conv1d, mlp, regression, resnet, rnn, transformer

MODULES = (mlp, cnn, resnet, transformer, conv1d, autoencoder, regression, rnn)
