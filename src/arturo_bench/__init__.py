"""arturo-bench: the arTuRO paper's experiments, side by side with Adam, AdamW and SGD.

Modules: ``configs`` (experiments and published hyperparameters), ``data`` (Fashion-MNIST IDX,
CIFAR pickles, on-device batches), ``models`` (CNN-F, CNN-C, ResNet-18/34), ``optimizers``,
``train`` (the loop), ``runs`` (on-disk layout, resume), ``report`` (tables, plots), ``cli``.
"""

__version__ = "0.1.0"
