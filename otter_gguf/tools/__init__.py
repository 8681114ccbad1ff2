"""Tools over the runtime and the reference: ``eval`` (quantized accuracy), ``bench`` (speed),
``train`` (fitting an Otter adapter on a frozen base) and ``doctor`` (what is installed and
whether it fits together)."""
