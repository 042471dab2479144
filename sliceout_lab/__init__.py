"""Experiments beside the pass: the A/B harness every comparison runs through
(:mod:`sliceout_lab.harness`), benchmarks, the demo, data and corpus loaders, reference models
and pretrained-weight fetchers.

``sliceout_fx`` is the transformation and imports nothing from here; this package uses it as a
user would, and brings the heavier dependencies experiments need (``tqdm``, ``matplotlib``,
``numpy``: the ``lab`` extra). The ``sliceout-fx bench`` and ``sliceout-fx demo`` commands run
it.
"""
