"""The book's application: "Deep Learning from Scratch", chapter 6, run on fastnorm's kernels.

* :mod:`fastnorm.book.models`: ``SimpleNN``, the MNIST MLP 784-256-128-10 (optional BatchNorm);
* :mod:`fastnorm.book.data`: MNIST as in-memory tensors, from an offline IDX folder or torchvision;
* :mod:`fastnorm.book.train`: the training loop (logs, checkpoints, ``--resume``, data parallel);
* :mod:`fastnorm.book.experiments`: the chapter's four experiments, each drawing a figure.

The library (``fastnorm.nn``, ``fastnorm.optim``, ...) never imports this package; the
``fastnorm`` command line imports it lazily, when a subcommand needs it.
"""
