"""Stream benchmark, student row (issue #17): a 1-step student stream session over the WebSocket vs the teacher's
1-step stream at the same size (32x32), one server process serving both.

    python benchmarks/stream_student.py --out benchmarks/results/stream_student_cpu.json

- teacher: `shapes`, img2img, t_index_list [45] (1 UNet call a frame), no guidance, the moving clip of
  `benchmarks/stream.py` sent one frame at a time (send, await the result, send the next);
- student: `shapes_fdistill`, txt2img (one `frame.request` a frame), t_index_list [0] = its one step at t = 999,
  no guidance;
both with the pipeline's VAE (``vae="full"``), the same WebSocket client (the SDK's StreamClient), JPEG output.
Rounds alternate teacher and student; fps = timed frames / wall after 5 warm-up frames, median over rounds.
Its pictures follow the prompt: the judge's prompt accuracy of the student's frames for 8 prompts x ``--judged``
frames each (a session per prompt, seed = the prompt's index).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine import machine
from serving import free_port, start_server
from stream import PROMPT, clip

from accel_diffusion.eval.shapes_eval import shapes_prompts
from accel_diffusion.eval.shapes_judge import ShapesJudge

STUDENT = "shapes_fdistill"
WARMUP = 5


async def _stream(base: str, model: str, frames: list[bytes] | None, count: int, prompt: str = PROMPT,
                  seed: int = 0) -> tuple[float, list[np.ndarray]]:
    """fps over ``count`` frames after the warm-up, and the output frames (img2img when ``frames`` is given)."""
    from accel_diffusion.clients import StreamClient

    options: dict[str, Any] = {"model": model, "guidance": "none", "output_format": "jpeg", "vae": "full",
                               "seed": seed}
    options.update({"t_index_list": [45]} if frames is not None else {"t_index_list": [0], "mode": "txt2img"})
    outputs = []
    async with StreamClient(base, prompt, **options) as stream:
        for k in range(WARMUP + count):
            if k == WARMUP:
                begin = time.perf_counter()
            if frames is not None:
                await stream.send(frames[k % len(frames)])
            else:
                await stream.request()
            frame = await stream.receive()
            if frame.image is not None:
                outputs.append(np.asarray(frame.image.convert("RGB")))
        wall = time.perf_counter() - begin
    return count / wall, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/stream_student_cpu.json")
    parser.add_argument("--frames", type=int, default=100, help="timed frames per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--judged", type=int, default=4, help="student frames judged per prompt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    encoded = []
    for frame in clip(args.frames + WARMUP):
        buffer = io.BytesIO()
        frame.save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    port = free_port()
    server = start_server(port, queue_max=8, served_models=json.dumps(["shapes", STUDENT]))
    base = f"http://127.0.0.1:{port}"
    fps: dict[str, list[float]] = {"teacher_1_step_img2img": [], "student_1_step_txt2img": []}
    try:
        for _ in range(args.rounds):
            fps["teacher_1_step_img2img"].append(asyncio.run(_stream(base, "shapes", encoded, args.frames))[0])
            fps["student_1_step_txt2img"].append(asyncio.run(_stream(base, STUDENT, None, args.frames))[0])
        prompts = shapes_prompts()[::len(shapes_prompts()) // 8][:8]
        judged: list[np.ndarray] = []
        for i, prompt in enumerate(prompts):
            _, outputs = asyncio.run(_stream(base, STUDENT, None, args.judged, prompt=prompt, seed=i))
            judged.extend(outputs[-args.judged:])
    finally:
        server.terminate()
        server.wait(60)
    images = np.stack(judged)
    accuracy = ShapesJudge.load().prompt_accuracy(images, [p for p in prompts for _ in range(args.judged)])
    teacher, student = (statistics.median(fps[k]) for k in fps)
    result = {"benchmark": "stream_student", "machine": machine(), "size": "32x32", "frames": args.frames,
              "rounds": args.rounds, "fps_rounds": fps, "teacher_fps": teacher, "student_fps": student,
              "student_vs_teacher": student / teacher, "student_frames_prompt_accuracy": accuracy,
              "judged_prompts": prompts, "judged_frames": len(images),
              "load_average_start_end": [list(load_start), list(os.getloadavg())]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
