"""Tests of the experiments beside the pass (sliceout_lab) and of the examples."""
