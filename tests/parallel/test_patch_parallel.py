"""Patch parallelism on 2 and 4 gloo processes (one thread each): parity, byte counts, seams.

One spawn per world size runs every mode (process start-up dominates on a shared CPU); each rank
saves its outputs and ``CommStats``, rank 0 the single-process reference too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from patch_workers import LATENT, TEXT_DIM, TEXT_TOKENS, spawn, tiny_unet

from accel_diffusion.parallel.volumes import call_bytes, layer_inventory

STEPS = 20
MODES = ("full_sync", "naive")


@pytest.fixture(scope="module", params=[2, 4], ids=["N2", "N4"])
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[dict[str, Any]]]:
    world = request.param
    out: Path = tmp_path_factory.mktemp(f"ranks{world}")
    return world, spawn(world, MODES, STEPS, out)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_full_sync_equals_one_process(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    _, results = ranks
    reference = results[0]["reference"]
    for rank, result in enumerate(results):
        out = result["full_sync"]
        assert _relative(out["call"], results[0]["reference_call"]) < 1e-5, f"rank {rank}: one UNet call"
        assert _relative(out["output"], reference) < 1e-4, f"rank {rank}: {STEPS} DDIM steps with CFG"
        assert torch.equal(out["output"], results[0]["full_sync"]["output"]), "every rank holds the same latents"


def test_tiny_unet_volumes_by_hand() -> None:
    """The inventory's closed form, against the tiny UNet's layers counted by hand (32 x 32 latent, fp32).

    k x k convs (C_in x W): at 32 wide 16+16+16 (down 0 and its downsampler) + 32 (upsampler) + 48+16+32+16 (up 1)
    + 16 (conv_out) = 208; at 16 wide 16+32 (down 1) + 4 x 32 (mid) + 64+32+48+32 (up 0) = 352; sum C W =
    208 x 32 + 352 x 16 = 12288. Self-attention: 4 layers of 256 tokens, C = 32. GroupNorms: 21 of 8 groups.
    """
    inventory = layer_inventory(tiny_unet(), LATENT, LATENT, torch.zeros(1, TEXT_TOKENS, TEXT_DIM))
    assert sum(c * w for c, _, w in inventory.convs) == 12288
    assert inventory.attentions == [(256, 32)] * 4
    assert inventory.norms == [8] * 21
    for n in (2, 4):
        volumes = call_bytes(inventory, world_size=n, batch=2, height=LATENT, width=LATENT)
        assert volumes == {
            "conv_halo": (n - 1) * 2 * 12288 * 2 * 4,
            "attention_kv": (n - 1) * 2 * 4 * (256 // n) * 2 * 32 * 4,
            "norm_stats": (n - 1) * 2 * 21 * 2 * 8 * 4,
            "output_gather": (n - 1) * 2 * 4 * (LATENT // n) * LATENT * 4,
        }
    assert call_bytes(inventory, world_size=4, batch=2, height=LATENT, width=LATENT) == {
        "conv_halo": 589824, "attention_kv": 393216, "norm_stats": 8064, "output_gather": 24576}


@pytest.mark.parametrize("mode", MODES)
def test_measured_bytes_equal_closed_form(ranks: tuple[int, list[dict[str, Any]]], mode: str) -> None:
    world, results = ranks
    inventory = layer_inventory(tiny_unet(), LATENT, LATENT, torch.zeros(1, TEXT_TOKENS, TEXT_DIM))
    expected = call_bytes(inventory, world_size=world, batch=2, height=LATENT, width=LATENT, mode=mode)
    for rank, result in enumerate(results):
        stats = result[mode]["stats"]
        assert stats["rank"] == rank and stats["world_size"] == world
        assert stats["steps"] == STEPS  # CFG: one batched call of 2 per step
        for step in stats["per_step"]:
            assert step["sent"] == expected, f"rank {rank} step {step['step']}"
            assert step["received"] == expected, f"rank {rank} step {step['step']}"
        assert stats["bytes_sent"] == {kind: STEPS * v for kind, v in expected.items()}
        assert result[mode]["call_stats"]["per_step"][0]["sent"] == expected


def test_naive_errors_concentrate_at_patch_borders(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    """One UNet call without any exchange: the error per latent row peaks on both sides of every seam."""
    world, results = ranks
    naive, reference = results[0]["naive"]["call"], results[0]["reference_call"]
    assert _relative(naive, reference) > 0.1  # no exchange is not a small change
    error = (naive - reference).abs().mean(dim=(0, 1, 3))  # per latent row
    rows = LATENT // world
    seams = [k * rows for k in range(1, world)]
    band = sorted({r for s in seams for r in (s - 2, s - 1, s, s + 1)})
    rest = [r for r in range(LATENT) if r not in band]
    assert float(error[band].mean()) > 1.4 * float(error[rest].mean())
    for s in seams:  # each seam's rows stand above the typical row away from seams
        assert float(error[s - 1 : s + 1].mean()) > 1.3 * float(error[rest].median())
