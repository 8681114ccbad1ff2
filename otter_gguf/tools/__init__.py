"""Tools over the runtime and the reference: ``eval`` (quantized accuracy) and ``bench`` (speed)."""
