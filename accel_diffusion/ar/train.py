"""``accel-diffusion train shapes_mar``: train the MAR-style model on the ``shapes`` latents (CPU).

Stages: render a fixed captioned dataset (``models/shapes/render.py``) and encode it once with the
shipped ``shapes`` VAE (latent posterior mean and std) and its frozen text encoder (every distinct
caption once, plus the empty prompt); then train the transformer and the diffusion head jointly:
per image a MaskGIT/MAR-style random mask (ratio cos(pi/2 u), u ~ U(0, 1), at least one token),
``--empty-prompt-prob`` (20%) empty prompts (so classifier-free guidance works), the head's loss on the masked tokens
(``head_loss``: each token ``--head-repeats`` times at independent timesteps), AdamW with warmup and cosine
decay over the steps or the ``--max-minutes`` budget (55), whichever runs out first (so a run stopped by its budget
ends annealed, whatever the machine's speed), gradient norm clipped to 1, EMA of the weights. The forward passes run
under bf16 autocast with the transformer and head compiled (``--precision``, ``--compile``: 1.5x per step on a CPU
with AMX, the same loss at equal steps; the model card's probes).
Tokens are ``--patch-size`` patches of the latents: 1 by default (64 tokens of 4 values, as MAR on its latents;
0.735 prompt accuracy at CFG 3 against 0.490 for 2x2 patches, 16 tokens of 16, in the same time: the model card's
probes), generated over 16 AR iterations.
Seeded; a checkpoint every ``--checkpoint-every`` steps in ``--work`` (resumed automatically: same data, same
RNG stream); the EMA weights are saved as a ``MarPipeline`` directory and measured
(prompt accuracy over the 196 prompts).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from accel_diffusion.ar.head import HEAD_NOISE, DiffusionHead, head_loss, head_noise_scheduler
from accel_diffusion.ar.model import MarTransformer, patchify
from accel_diffusion.ar.pipeline import BASE_FILES, MarPipeline, base_dir, file_sha256
from accel_diffusion.eval.shapes_judge import to_tensor
from accel_diffusion.models.shapes.cpu import flushing_denormals
from accel_diffusion.models.shapes.render import render_dataset

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "models" / "builtin" / "shapes_mar"


def _lr_factor(step: int, total: int, warmup: int = 100, floor: float = 0.05, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to ``floor`` over the run: the run's progress is the further of its
    steps (of ``total``) and its share of the time budget (``time_fraction``), so a run stopped by its time
    budget ends annealed, however fast the machine."""
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, max((step - warmup) / max(1, total - warmup), time_fraction))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


@torch.no_grad()
def encode_data(pipe_parts: tuple[Any, Any, Any], n: int, seed: int, batch: int = 500) -> dict[str, Any]:
    """Rendered images -> latent mean/std; captions -> index into the distinct captions' text states."""
    tokenizer, text_encoder, vae = pipe_parts
    images, captions, _ = render_dataset(n, seed=seed)
    means, stds = [], []
    for i in tqdm(range(0, n, batch), desc="encode", mininterval=5.0):
        post = vae.encode(to_tensor(images[i : i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    distinct = [*sorted(set(captions)), ""]
    ids = tokenizer(distinct, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    states = torch.cat([text_encoder(ids[i : i + 256])[0] for i in range(0, len(distinct), 256)])
    index = {c: i for i, c in enumerate(distinct)}
    return {"mean": torch.cat(means), "std": torch.cat(stds), "states": states,
            "caption_index": torch.tensor([index[c] for c in captions]), "empty_index": len(distinct) - 1}


def random_mask(batch: int, num_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """(B, N) bool, True = masked: cos(pi/2 u) of the tokens (at least one), at random positions."""
    ratio = torch.cos(math.pi / 2 * torch.rand(batch, generator=gen))
    count = torch.clamp(torch.ceil(ratio * num_tokens), 1, num_tokens)
    ranks = torch.rand(batch, num_tokens, generator=gen).argsort(dim=1).argsort(dim=1)
    return ranks < count[:, None]


def training_contexts(precision: str) -> contextlib.ExitStack:
    """The forward passes' numerics: ``bf16``: autocast to bfloat16 (matrix products on the CPU's AMX/AVX-512
    bf16 units: 6-7x fp32's rate on this machine's 2 cores) with attention on the math kernel (the fused CPU
    flash-attention kernel's bf16 backward is 6x slower than its fp32 one); ``fp32``: as is."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision is 'bf16' or 'fp32', got {precision!r}")
    stack = contextlib.ExitStack()
    if precision == "bf16":
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    return stack


@flushing_denormals()
def train_shapes_mar(
    out: str | Path = DEFAULT_OUT,
    work: str | Path | None = None,
    steps: int = 30000,
    batch_size: int = 64,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    n_images: int = 50000,
    seed: int = 0,
    checkpoint_every: int = 100,
    width: int = 128,
    depth: int = 4,
    head_width: int = 192,
    head_depth: int = 3,
    pos_init_std: float = 0.5,
    empty_prompt_prob: float = 0.2,
    patch_size: int = 1,
    head_repeats: int = 1,
    ar_iterations: int = 16,
    measure: bool = True,
    max_minutes: float | None = 55.0,
    precision: str = "bf16",
    compile: bool = True,
    export_only: bool = False,
    guidance_scales: tuple[float, ...] = (1.0, 3.0, 5.0),
    note: str = "",
) -> dict[str, Any]:
    """Train into ``out``; ``work`` (default: ``<out>.work``) holds the encoded data and the checkpoint a rerun
    resumes from."""
    out = Path(out)
    work = Path(work) if work is not None else out.with_name(out.name + ".work")
    torch.manual_seed(seed)
    t_start = time.time()
    base = "shapes"
    parts = MarPipeline.load_base(base)
    scaling = float(parts[2].config.scaling_factor)
    work.mkdir(parents=True, exist_ok=True)
    data_file = work / f"data-{n_images}-{seed}.pt"
    if data_file.exists():
        data = torch.load(data_file, weights_only=True)
    else:
        data = encode_data(parts, n_images, seed)
        torch.save(data, data_file)
    t_data = time.time() - t_start
    patch, channels, size = patch_size, parts[2].config.latent_channels, 8
    num_tokens, token_dim = (size // patch) ** 2, channels * patch * patch
    transformer = MarTransformer(token_dim=token_dim, num_tokens=num_tokens, text_dim=data["states"].shape[-1],
                                 text_len=data["states"].shape[1], width=width, depth=depth, heads=4,
                                 pos_init_std=pos_init_std)
    head = DiffusionHead(token_dim=token_dim, cond_dim=width, width=head_width, depth=head_depth)
    params = list(transformer.parameters()) + list(head.parameters())
    ema_t, ema_h = copy.deepcopy(transformer).eval(), copy.deepcopy(head).eval()
    ema_params = list(ema_t.parameters()) + list(ema_h.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed + 1)
    noise_sched = head_noise_scheduler()
    ckpt = work / "checkpoint.pt"
    start, train_seconds = 0, 0.0
    loss_at_checkpoint = None
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        transformer.load_state_dict(state["transformer"])
        head.load_state_dict(state["head"])
        ema_t.load_state_dict(state["ema_transformer"])
        ema_h.load_state_dict(state["ema_head"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start, train_seconds = int(state["step"]), float(state["train_seconds"])
        t_data = float(state.get("data_seconds", t_data))
        loss_at_checkpoint = state.get("loss_ema")
        print(f"resuming at step {start} from {ckpt}")
    mean, std, states = data["mean"], data["std"], data["states"]
    caption_index, empty_index = data["caption_index"], data["empty_index"]
    transformer.train()
    head.train()
    # compiled for training only (the EMA copies are what is saved); the head's token count varies per batch
    train_transformer = torch.compile(transformer) if compile else transformer
    train_head = torch.compile(head, dynamic=True) if compile else head
    budget = None if max_minutes is None else 60 * max_minutes
    bar = tqdm(range(start, start if export_only else steps), desc="shapes_mar", initial=start, total=steps,
               mininterval=5.0)
    t_loop = time.time()
    loss_avg = None if loss_at_checkpoint is None else float(loss_at_checkpoint)
    steps_done = start
    for step in bar:
        idx = torch.randint(0, len(mean), (batch_size,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        tokens = patchify(latents, patch)
        text_idx = caption_index[idx].clone()
        text_idx[torch.rand(batch_size, generator=gen) < empty_prompt_prob] = empty_index
        mask = random_mask(batch_size, num_tokens, gen)
        with training_contexts(precision):
            z = train_transformer(tokens, mask, states[text_idx])
            loss = head_loss(train_head, tokens[mask], z[mask], noise_sched, gen, repeats=head_repeats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        elapsed = train_seconds + time.time() - t_loop
        factor = _lr_factor(step, steps, time_fraction=elapsed / budget if budget else 0.0)
        for group in opt.param_groups:
            group["lr"] = lr * factor
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - d)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_avg:.4f}", refresh=False)
        out_of_time = max_minutes is not None and train_seconds + time.time() - t_loop > 60 * max_minutes
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps or out_of_time:
            torch.save({"transformer": transformer.state_dict(), "head": head.state_dict(),
                        "ema_transformer": ema_t.state_dict(), "ema_head": ema_h.state_dict(),
                        "opt": opt.state_dict(), "gen": gen.get_state(),
                        "step": step + 1, "train_seconds": train_seconds + time.time() - t_loop,
                        "data_seconds": t_data, "loss_ema": loss_avg}, ckpt)
        steps_done = step + 1
        if out_of_time:
            print(f"stopping after {steps_done} of {steps} steps: --max-minutes {max_minutes} reached")
            break
    train_seconds += time.time() - t_loop
    config = {
        "base": base, "patch_size": patch, "latent_channels": channels, "latent_size": size,
        "default_ar_iterations": ar_iterations, "default_head_steps": 50,
        "base_sha256": {name: file_sha256(base_dir(base) / name) for name in BASE_FILES},
    }
    from diffusers import DDPMScheduler

    pipe = MarPipeline(ema_t, ema_h, DDPMScheduler(**HEAD_NOISE, clip_sample=False, variance_type="fixed_small"),
                       *parts, config)
    pipe.save_pretrained(out)
    info: dict[str, Any] = {
        "steps_done": steps_done,
        "args": {"steps": steps, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay, "n_images": n_images,
                 "seed": seed, "width": width, "depth": depth, "head_width": head_width, "head_depth": head_depth,
                 "pos_init_std": pos_init_std, "empty_prompt_prob": empty_prompt_prob,
                 "patch_size": patch_size, "head_repeats": head_repeats, "ar_iterations": ar_iterations,
                 "max_minutes": max_minutes, "precision": precision, "compile": compile},
        "parameters": {"transformer": sum(p.numel() for p in ema_t.parameters()),
                       "head": sum(p.numel() for p in ema_h.parameters())},
        "final_loss_ema": loss_avg, "data_seconds": t_data, "train_seconds": train_seconds,
        "torch_threads": torch.get_num_threads(), "load_average_at_save": list(os.getloadavg()), "note": note,
    }
    if measure:
        info["metrics"] = measure_shapes_mar(out, guidance_scales, iterations=ar_iterations)
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    write_model_card(out, info)
    return info


def _over(args: dict[str, Any]) -> str:
    if args.get("max_minutes") is None:
        return ""
    return f" over the {args['steps']} steps or the {args['max_minutes']:g}-minute budget, whichever comes first"


def _numerics(args: dict[str, Any]) -> str:
    precision = args.get("precision", "fp32")
    text = "bf16 autocast (attention on the math kernel)" if precision == "bf16" else "fp32"
    return text + (", transformer and head compiled (torch.compile)" if args.get("compile") else "")


def _times(repeats: int) -> str:
    return "each once" if repeats == 1 else f"each {repeats} times (independent noise levels)"


def write_model_card(out: Path, info: dict[str, Any]) -> None:
    """README.md: what the model is, how it was trained, and what was measured."""
    a, p = info["args"], info["parameters"]
    patch = a.get("patch_size", 2)
    tokens = (8 // patch) ** 2
    metrics = info.get("metrics", {})
    rows = [f"| {k.removeprefix('cfg_')} | {v['all']:.3f} | {v['shape']:.3f} | {v['color']:.3f} | "
            f"{v['background']:.3f} | {v['seconds']:.0f} |" for k, v in metrics.items() if k.startswith("cfg_")]
    lines = [
        "# shapes_mar — a masked-autoregressive model with a per-token diffusion head",
        "",
        "A MAR-style model (Li et al. 2024) over the `shapes` model's latent space, the target of DiSA step",
        "annealing (`schedule: {\"name\": \"disa\", ...}`). Code: `accel_diffusion/ar/`.",
        "",
        f"- **Tokens**: the `shapes` VAE's 8x8x4 latents (times its scaling factor) in {patch}x{patch} patches:"
        f" {tokens} tokens of {4 * patch * patch} values.",
        "  Tokenizer, text encoder and VAE are the `shapes` model's, read from `../shapes`",
        "  (`mar_config.json`: `base`, with the SHA-256 of the files it was trained with).",
        f"- **Transformer** (`transformer/`): bidirectional, width {a['width']}, {a['depth']} layers, 4 heads, the",
        "  prompt's 16 text states prepended; masked tokens replaced by a learned embedding;"
        f" {p['transformer']:,} parameters.",
        f"- **Diffusion head** (`head/`): MLP with adaptive LayerNorm (MAR's SimpleMLPAdaLN), width {a['head_width']},",
        f"  {a['head_depth']} residual blocks, {p['head']:,} parameters; noise process `head_scheduler/`: MAR's cosine",
        "  schedule (1000 steps), v-prediction (see `ar/head.py` for why not epsilon), DDPM fixed variance.",
        "- **Generation**: random token order, MAR's cosine mask schedule over the AR iterations"
        f" (default {a.get('ar_iterations', 8)}),",
        "  classifier-free guidance against the empty prompt on the transformer and the head, the head sampled",
        "  by a sampler component (DDPM ancestral by default) through the engine's loop.",
        "",
        "## Training recipe (`accel-diffusion train shapes_mar`, seeded, resumable)",
        "",
        f"{a['n_images']:,} renders (seed {a['seed']}) encoded once; batch {a['batch_size']}, AdamW lr {a['lr']}"
        f" (weight decay 0.01, 100 warm-up steps, cosine to 5%{_over(a)}), gradient norm 1, EMA {a['ema_decay']};"
        f" {_numerics(a)}; per image a"
        f" random mask of cos(pi/2 u) of the tokens; {a.get('empty_prompt_prob', 0.1):.0%} empty prompts; the head's"
        f" loss on the masked tokens, {_times(a.get('head_repeats', 4))}; position embeddings initialised at std"
        f" {a.get('pos_init_std', 0.02)}.",
        f"Planned {a['steps']} steps; **ran {info['steps_done']}** in {info['train_seconds'] / 60:.1f} minutes of"
        f" training (plus {info['data_seconds'] / 60:.1f} minutes rendering and encoding),"
        f" {info['torch_threads']} torch thread{'s' if info['torch_threads'] != 1 else ''}."
        f" {info['note']} Final loss (EMA of the batch loss): {info['final_loss_ema'] or float('nan'):.4f}.",
        "",
        "## Measured (the shipped weights, loaded back from disk)",
        "",
        f"Prompt accuracy over the 196 shape/colour/background prompts, one seed each, the `shapes` judge;"
        f" {metrics.get('ar_iterations', '?')} AR iterations, constant {metrics.get('head_steps', '?')} DDPM head"
        " steps:",
        "",
        "| CFG scale | all three right | shape | colour | background | seconds (196 images) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    heldout = {k: v for k, v in metrics.items() if k.startswith("heldout_cfg_")}
    for key, v in heldout.items():
        lines += [f"Held-out seeds (10000 + i, the same 196 prompts; `benchmarks/disa.py` measures the same way), CFG"
                  f" {key.removeprefix('heldout_cfg_')}: prompt accuracy **{v['all']:.3f}** (shape {v['shape']:.3f},"
                  f" colour {v['color']:.3f}, background {v['background']:.3f}).", ""]
    if "context_use" in metrics:
        c = metrics["context_use"]
        lines += [f"Context use (`ar/train.py: context_use`, 256 held-out renders): the error of the head's estimate"
                  f" of the masked tokens (token variance {c['token_variance']:.3f}) is {c['with_context']:.3f} with"
                  f" {c['known_tokens']} of the {tokens} tokens known and {c['prompt_only']:.3f} from the prompt"
                  " alone.", ""]
    (out / "README.md").write_text("\n".join(lines))


@torch.no_grad()
def context_use(pipe: MarPipeline, n: int = 256, known: int = 8, seed: int = 12_345) -> dict[str, float]:
    """Whether the transformer reads the known tokens: the error of the head's estimate of the masked tokens
    (one DDIM step from pure noise: E[x0 | z]) on ``n`` held-out renders with ``known`` of the tokens given,
    against the same with none given (the prompt alone). Equal errors: the tokens are drawn independently."""
    from accel_diffusion.ar.sampling import sample_head
    from accel_diffusion.guidance.base import COND
    from accel_diffusion.registry import get_registry

    images, captions, _ = render_dataset(n, seed=seed)
    scaling = pipe.vae.config.scaling_factor
    latents = pipe.vae.encode(to_tensor(images)).latent_dist.mean * scaling
    tokens = patchify(latents, pipe.config["patch_size"])
    text, _ = pipe.text_states(captions)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, tokens.shape[1], generator=gen).argsort(dim=1) >= known
    registry = get_registry()
    errors = {}
    for name, visible in (("with_context", mask), ("prompt_only", torch.ones_like(mask))):
        z = pipe.transformer(tokens, visible, text)[mask]
        estimate = sample_head(pipe.head, {COND: z}, torch.randn(z.shape[0], tokens.shape[2], generator=gen),
                               registry.build("sampler", "ddim"), pipe.head_scheduler_config, 1,
                               registry.build("guidance", "none"))
        errors[name] = float(((estimate - tokens[mask]) ** 2).mean())
    return {"known_tokens": known, "token_variance": float(tokens[mask].var()), **errors}


def measure_shapes_mar(model_dir: Path, guidance_scales: tuple[float, ...] = (1.0, 3.0, 5.0),
                       iterations: int = 8, head_steps: int = 50, heldout_scale: float | None = 5.0,
                       ) -> dict[str, Any]:
    """Prompt accuracy over the 196 prompts (one seed each: seed i) at constant ``head_steps``, per CFG scale, and
    at ``heldout_scale`` on held-out seeds (10000 + i)."""
    from accel_diffusion.eval.shapes_eval import shapes_prompts
    from accel_diffusion.eval.shapes_judge import ShapesJudge
    from accel_diffusion.registry import get_registry

    pipe = MarPipeline.from_pretrained(model_dir)
    judge = ShapesJudge.load()
    prompts = shapes_prompts()
    registry = get_registry()
    out: dict[str, Any] = {"ar_iterations": iterations, "head_steps": head_steps, "sampler": "ddpm",
                           "context_use": context_use(pipe, known=pipe.transformer.config.num_tokens // 2)}
    print(f"context use: {out['context_use']}")
    runs = [(f"cfg_{scale:g}", scale, 0) for scale in guidance_scales]
    if heldout_scale is not None:
        runs.append((f"heldout_cfg_{heldout_scale:g}", heldout_scale, 10_000))
    for key, scale, first_seed in runs:
        t0 = time.time()
        images = np.concatenate([
            pipe.generate(prompts[i : i + 49], list(range(first_seed + i, first_seed + i + len(prompts[i : i + 49]))),
                          [head_steps] * iterations, registry.build("sampler", "ddpm"),
                          lambda s=scale: registry.build("guidance", {"name": "cfg", "scale": s})).images
            for i in range(0, len(prompts), 49)])
        acc = judge.prompt_accuracy(images, prompts)
        out[key] = {**acc, "seconds": round(time.time() - t0, 2)}
        print(f"{key}: prompt accuracy {acc['all']:.3f} ({time.time() - t0:.0f} s)")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="accel-diffusion train shapes_mar", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, default=None, help="data and checkpoint, resumed (default: OUT.work)")
    parser.add_argument("--steps", type=int, default=30000,
                        help="the most steps (the cosine decay ends at these or at --max-minutes, whichever first)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--width", type=int, default=128, help="transformer width")
    parser.add_argument("--depth", type=int, default=4, help="transformer layers")
    parser.add_argument("--head-width", type=int, default=192)
    parser.add_argument("--head-depth", type=int, default=3)
    parser.add_argument("--pos-init-std", type=float, default=0.5,
                        help="initial scale of the position embeddings (ar/model.py says why it matters)")
    parser.add_argument("--empty-prompt-prob", type=float, default=0.2,
                        help="share of training images with the empty prompt (CFG's unconditional branch)")
    parser.add_argument("--patch-size", type=int, default=1, help="latent patch side per token (1: 64 tokens of 4)")
    parser.add_argument("--head-repeats", type=int, default=1,
                        help="noise levels per masked token in the head's loss (MAR's diffusion_batch_mul)")
    parser.add_argument("--ar-iterations", type=int, default=16,
                        help="the saved model's default AR iterations (and the measurement's)")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--max-minutes", type=float, default=55.0,
                        help="the training's time budget: the learning rate anneals over it and training stops (and "
                        "saves) at it (default 55: the whole command, rendering, training and the measurement, fits "
                        "60 minutes on a 2-core CPU)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="bf16: autocast (fast on CPUs with AMX / AVX-512 bf16); fp32: as is")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the transformer and head for training")
    parser.add_argument("--no-measure", action="store_true")
    parser.add_argument("--export-only", action="store_true", help="save and measure the checkpoint, no training")
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    parser.add_argument("--note", default="", help="a sentence for the model card (e.g. the machine's load)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = train_shapes_mar(args.out, args.work, args.steps, args.batch_size, args.lr, n_images=args.images,
                            seed=args.seed, checkpoint_every=args.checkpoint_every, width=args.width, depth=args.depth,
                            head_width=args.head_width, head_depth=args.head_depth, pos_init_std=args.pos_init_std,
                            empty_prompt_prob=args.empty_prompt_prob, patch_size=args.patch_size,
                            head_repeats=args.head_repeats, ar_iterations=args.ar_iterations,
                            ema_decay=args.ema_decay,
                            measure=not args.no_measure,
                            max_minutes=args.max_minutes, precision=args.precision, compile=args.compile,
                            export_only=args.export_only,
                            guidance_scales=tuple(args.guidance_scales), note=args.note)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
