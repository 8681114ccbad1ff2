"""``python -m otter_gguf.demo.smollm2 path``: print the cached SmolLM2 GGUF's path (fetching it once)."""

import sys

from otter_gguf.demo.smollm2 import model_path

if __name__ == "__main__":
    if sys.argv[1:] != ["path"]:
        sys.exit("usage: python -m otter_gguf.demo.smollm2 path")
    print(model_path())
