"""The PyTorch reference (docs/OTTER.md §3): base and Otter forward passes, insertion, training, test fixtures.

Needs torch (``pip install torch==2.13.0``, the CPU build); nothing outside
this package and the tools that compare against it imports it, so
``import otter_gguf`` works without torch.
"""

try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "otter_gguf.reference needs PyTorch, which is not installed; install the CPU build with "
        "`pip install torch==2.13.0` (an unpinned torch pulls several GB of CUDA wheels)"
    ) from e
