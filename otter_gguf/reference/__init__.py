"""The PyTorch reference (spec §3): base and Otter forward passes, insertion, training, test fixtures.

Needs torch (``pip install torch==2.13.0``); nothing outside this package and
the tools that compare against it imports it, so ``import otter_gguf`` works
without torch.
"""
