"""``torchrun --nproc_per_node N -m accel_diffusion.parallel generate ...``: one generation split by rows
over N ranks (gloo on CPU, NCCL on CUDA). Every rank loads the model and runs the engine; rank 0 writes
the images and results.json, whose ``communication`` lists every rank's bytes."""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import click
import torch
import torch.distributed as dist

from accel_diffusion.errors import AccelDiffusionError


@click.group()
def main() -> None:
    """Patch-parallel generation over torch.distributed ranks (start under torchrun)."""


@main.command()
@click.option("--model", "-m", default="shapes", show_default=True, help="Model id from the registry.")
@click.option("--prompt", "-p", "prompts", multiple=True, required=True, help="Prompt (repeat for several).")
@click.option("--negative-prompt", default=None)
@click.option("--seed", type=int, default=None, help="Seed of the first image (rank 0's is used on every rank).")
@click.option("--width", type=int, default=None)
@click.option("--height", type=int, default=None)
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the model's).")
@click.option("--strategy", default=None, help="Strategy as JSON (sampler, schedule, guidance).")
@click.option("--mode", type=click.Choice(["full_sync", "distrifusion", "pcpp", "naive"]), default="distrifusion",
              show_default=True)
@click.option("--warmup-steps", type=int, default=4, show_default=True, help="Synchronous steps (distrifusion, pcpp).")
@click.option("--rho", type=float, default=0.5, show_default=True, help="pcpp: fraction of each neighbour's rows.")
@click.option("--models", "models_file", type=click.Path(dir_okay=False), default=None, help="Model registry TOML.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="outputs", show_default=True)
@click.option("--timeout", type=int, default=600, show_default=True, help="Seconds a rank waits for the others.")
def generate(model: str, prompts: tuple[str, ...], negative_prompt: str | None, seed: int | None, width: int | None,
             height: int | None, steps: int | None, strategy: str | None, mode: str, warmup_steps: int, rho: float,
             models_file: str | None, out_dir: str, timeout: int) -> None:
    """Generate images into OUT (PNG files plus results.json), every rank computing one band of rows."""
    from accel_diffusion.cli import _strategy_from_options, _write_results
    from accel_diffusion.engine import Engine
    from accel_diffusion.models.registry import ModelRegistry
    from accel_diffusion.strategy import GenerationRequest, Strategy
    from accel_diffusion.third_party_output import quiet_third_party_output

    if "RANK" not in os.environ:
        raise click.UsageError("start it under torchrun: torchrun --nproc_per_node N -m accel_diffusion.parallel "
                               "generate ...")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
    rank = dist.get_rank()
    try:
        quiet_third_party_output()
        try:
            data = _strategy_from_options(strategy).model_dump(exclude_none=True)
            data["runtime"] = {"name": "patch_parallel", "mode": mode, "warmup_steps": warmup_steps, "rho": rho}
            request = GenerationRequest.create(model=model, prompt=list(prompts), seed=seed,
                                               negative_prompt=negative_prompt, width=width, height=height,
                                               steps=steps, strategy=Strategy.parse(data))
            result = Engine(ModelRegistry.from_file(models_file)).generate(request)
        except AccelDiffusionError as exc:  # every rank validates the same request: all of them stop here
            if rank == 0:
                click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        reports: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(reports, result.extra["communication"])
        if rank == 0:
            result.extra["communication"] = reports
            written = _write_results(Path(out_dir), [result])
            click.echo(json.dumps({"images": [str(p) for p in written], "nfe": result.nfe,
                                   "bytes_sent_per_step": [r["bytes_sent_per_step"][-1] for r in reports]}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
