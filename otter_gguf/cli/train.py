"""``otter-gguf train``: fit an Otter head on a frozen base (docs/TRAIN.md)."""

from __future__ import annotations

from pathlib import Path

import click

from otter_gguf.cli.errors import reported


@click.command("train")
@click.argument("base", metavar="BASE", type=click.Path(path_type=Path))
@click.argument("data", metavar="DATA.jsonl", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path),
              help="Adapter directory to write (otter_config.json + otter_model.safetensors + train_metrics.json).")
@click.option("--objective", type=click.Choice(["pairwise", "token_regression", "sequence_regression",
                                                "next_token"]),
              default=None, help="Default: from the data's fields (docs/TRAIN.md).")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None,
              help="Held-out JSONL (default: a seeded --heldout share of DATA).")
@click.option("--heldout", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option("--d2", type=click.IntRange(min=1), default=None, help="Side hidden size [32].")
@click.option("--h2", type=click.IntRange(min=1), default=None, help="Side query heads [1].")
@click.option("--h2-kv", type=click.IntRange(min=1), default=None, help="Side KV heads [1].")
@click.option("--f2", type=click.IntRange(min=1), default=None, help="Side FFN size [32].")
@click.option("--signal-name", default="reward", show_default=True, help="Name of the reward head's signal.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps (default: --epochs).")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-4, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-length", type=click.IntRange(min=2), default=1024, show_default=True,
              help="Longest record in tokens (longer ones are an error).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Checkpoint file, written every --checkpoint-every steps.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from --checkpoint if it exists.")
@click.option("--eval-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Held-out metrics every N steps (0: only at the end).")
@click.option("--device", default=None, help="torch device (default: cuda when torch sees a GPU, else cpu).")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--save-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True)
@click.option("--gguf", type=click.Path(path_type=Path), default=None,
              help="Also write one Otter GGUF (base + head) with otter-gguf convert.")
@click.option("--outtype", default="q8_0", show_default=True, help="Otter tensor type of --gguf.")
@click.option("--sidecar", is_flag=True, help="--gguf: write the head alone (an adapter GGUF beside the base).")
@click.option("--force", is_flag=True, help="Replace an existing --out / --gguf.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train_command(base: Path, data: Path, out: Path, objective, eval_data, heldout, d2, h2, h2_kv, f2,
                  signal_name, steps, epochs, lr, batch_size, seed, max_length, checkpoint, checkpoint_every,
                  resume, eval_every, device, threads, save_dtype, gguf, outtype, sidecar, force,
                  no_progress) -> None:
    """Train an Otter head on BASE (an HF model directory or a GGUF) with DATA.jsonl.

    The base stays frozen; the side weights start as copies of the base's and the
    head is small (the paper's initialisation). Data formats: docs/TRAIN.md.
    """
    from otter_gguf.format.config import AdapterError
    from otter_gguf.reference.data import TrainDataError
    from otter_gguf.reference.model import ReferenceError as RefError
    from otter_gguf.tools import train as tr
    from otter_gguf_converter.errors import ConvertError

    settings = tr.TrainSettings(objective=objective, heldout=heldout, d2=d2, h2=h2, h2_kv=h2_kv, f2=f2,
                                signal_name=signal_name, steps=steps, epochs=epochs, lr=lr,
                                batch_size=batch_size, seed=seed, max_length=max_length,
                                checkpoint_every=checkpoint_every, eval_every=eval_every,
                                save_dtype=save_dtype)
    with reported("train", TrainDataError, tr.TrainError, RefError, ConvertError, AdapterError):
        report = tr.train(base, data, out, settings, eval_data=eval_data, checkpoint=checkpoint, resume=resume,
                          force=force, device=device, threads=threads, gguf=gguf, outtype=outtype,
                          sidecar=sidecar, progress=not no_progress)
    metrics = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in report["heldout"].items())
    click.echo(f"{out}: {report['objective']}, held-out {metrics or '(none)'}; "
               f"{report['train_seconds']:.0f}s, {report['tokens_per_s']:.0f} tokens/s")
