"""``otter-gguf eval --quality``: Otter heads against reward models trained on the same data, quality judged by
a third party and cost measured in the same run (docs/EVAL.md, "Quality")."""

from otter_gguf.tools.quality.run import QualitySettings, format_tables, run_quality

__all__ = ["QualitySettings", "format_tables", "run_quality"]
