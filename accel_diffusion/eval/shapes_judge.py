"""Judge classifier for the ``shapes`` model: prompt accuracy and features for a Fréchet distance.

A small CNN (3 conv stages, 16/32/64 channels) with one head each for shape, colour, background
and size class, trained on fresh renders augmented with blur, noise and slight colour jitter so
it also reads VAE reconstructions and generated images.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from accel_diffusion.models.shapes.cpu import flushing_denormals
from accel_diffusion.models.shapes.render import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    SIZE_CLASSES,
    parse_caption,
    render_dataset,
)

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "models" / "builtin" / "shapes_judge"
HEADS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "background": BACKGROUNDS,
    "size": SIZE_CLASSES,
}


class JudgeNet(nn.Module):
    """3-stage CNN with a shared feature layer and one linear head per attribute."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64), feature_dim: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * 4 * 4, feature_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(v)) for k, v in HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [-1, 1], NCHW."""
        return F.relu(self.fc(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: h(f) for k, h in self.heads.items()}


def to_tensor(images: Any) -> torch.Tensor:
    """uint8 NHWC array / list of PIL images / NCHW float tensor in [-1, 1] -> float NCHW in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    if images.ndim == 3:
        images = images[None]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur, colour jitter, noise and slight ringing on a batch in [-1, 1]."""
    n = x.shape[0]

    def rnd(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen)

    k = torch.tensor([1.0, 2.0, 1.0])
    k2 = (k[:, None] * k[None, :] / 16.0).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    t = rnd(n, 1, 1, 1) * (rnd(n, 1, 1, 1) < 0.7)
    x = x + (blurred - x) * t
    # unsharp ringing (negative t) on some samples, like decoder overshoot
    s = 0.5 * rnd(n, 1, 1, 1) * (rnd(n, 1, 1, 1) < 0.2)
    x = x - (blurred - x) * s
    gain = 1.0 + 0.08 * (rnd(n, 3, 1, 1) - 0.5)
    offset = 0.08 * (rnd(n, 3, 1, 1) - 0.5)
    x = x * gain + offset
    x = x + 0.06 * rnd(n, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    return x.clamp(-1.0, 1.0)


@flushing_denormals()
def train_judge(
    out_dir: str | Path = DEFAULT_DIR,
    seed: int = 0,
    n_train: int = 40_000,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    eval_seed: int = 12345,
    n_eval: int = 2000,
) -> dict:
    """Train the judge from fresh renders and save it (safetensors + config.json) to ``out_dir``."""
    t0 = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, _, labels = render_dataset(n_train, seed=seed + 1000)
    x_all = to_tensor(images)
    y_all = {k: torch.from_numpy(v) for k, v in labels.items()}
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    net.train()
    bar = tqdm(range(steps), desc="judge", mininterval=2.0)
    for _ in bar:
        idx = torch.randint(0, n_train, (batch_size,), generator=gen)
        x = _augment(x_all[idx], gen)
        out = net(x)
        loss = sum(F.cross_entropy(out[k], y_all[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    net.eval()
    train_s = time.time() - t0
    judge = ShapesJudge(net, {})
    ev_images, ev_caps, ev_labels = render_dataset(n_eval, seed=eval_seed)
    acc = judge.prompt_accuracy(ev_images, ev_caps)
    preds = judge.predict_all(ev_images)
    acc["size"] = float((preds["size"] == ev_labels["size"]).mean())
    metrics = {"fresh_render_accuracy": acc, "eval_seed": eval_seed, "n_eval": n_eval, "train_seconds": train_s}
    config = {
        "channels": [16, 32, 64],
        "feature_dim": 128,
        "heads": {k: list(v) for k, v in HEADS.items()},
        "input": "RGB uint8 32x32, scaled to [-1, 1]",
        "train": {"seed": seed, "n_train": n_train, "steps": steps, "batch_size": batch_size, "lr": lr},
        "metrics": metrics,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return metrics


class ShapesJudge:
    """Loaded judge classifier; all methods take uint8 NHWC arrays or lists of PIL images."""

    def __init__(self, net: JudgeNet, config: dict, batch_size: int = 512) -> None:
        self.net = net.eval()
        self.config = config
        self.batch_size = batch_size

    @classmethod
    def load(cls, path: str | Path | None = None) -> ShapesJudge:
        """Load the judge from ``path`` (default: the shipped weights)."""
        p = Path(path) if path is not None else DEFAULT_DIR
        config = json.loads((p / "config.json").read_text())
        net = JudgeNet(config.get("channels", (16, 32, 64)), config.get("feature_dim", 128))
        net.load_state_dict(load_file(str(p / "model.safetensors")))
        return cls(net, config)

    @torch.no_grad()
    def _run(self, images: Any, fn: str) -> list:
        x = to_tensor(images)
        outs = []
        for i in range(0, x.shape[0], self.batch_size):
            xb = x[i : i + self.batch_size]
            outs.append(self.net.features(xb) if fn == "features" else self.net(xb))
        return outs

    def predict_all(self, images: Any) -> dict[str, np.ndarray]:
        """Predicted class indices per head (shape, color, background, size)."""
        outs = self._run(images, "logits")
        return {k: torch.cat([o[k] for o in outs]).argmax(1).numpy() for k in HEADS}

    def predict(self, images: Any) -> list[tuple[str, str, str]]:
        """Predicted ``(shape, color, background)`` per image."""
        p = self.predict_all(images)
        return [(SHAPES[s], COLORS[c], BACKGROUNDS[b]) for s, c, b in zip(p["shape"], p["color"], p["background"])]

    def features(self, images: Any) -> torch.Tensor:
        """Penultimate-layer features, shape (N, 128)."""
        return torch.cat(self._run(images, "features"))

    def prompt_accuracy(self, images: Any, prompts: Sequence[str]) -> dict[str, float]:
        """Fraction with shape, colour and background all right (``all``), plus per attribute."""
        preds = self.predict(images)
        if len(preds) != len(prompts):
            raise ValueError(f"{len(preds)} images but {len(prompts)} prompts")
        truth = [parse_caption(p) for p in prompts]
        ok = np.array([[a == b for a, b in zip(p, t)] for p, t in zip(preds, truth)], dtype=bool)
        return {
            "all": float(ok.all(1).mean()),
            "shape": float(ok[:, 0].mean()),
            "color": float(ok[:, 1].mean()),
            "background": float(ok[:, 2].mean()),
        }


def main() -> None:
    """Train the judge into the shipped location."""
    print(json.dumps(train_judge(), indent=2))


if __name__ == "__main__":
    main()
