"""The official `openai` package against the server's OpenAI-compatible images API.

    ACCEL_DIFFUSION_URL=http://127.0.0.1:8000 python clients/examples/openai_generate.py OUT_DIR
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

from openai import OpenAI

url = os.environ.get("ACCEL_DIFFUSION_URL", "http://127.0.0.1:8000")
out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs")
out_dir.mkdir(parents=True, exist_ok=True)

client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("ACCEL_DIFFUSION_API_KEY", "unused"))
model = client.models.list().data[0].id
response = client.images.generate(model=model, prompt="a yellow triangle on a black background", n=2,
                                   response_format="b64_json",
                                   extra_body={"seed": 11, "num_inference_steps": 4})  # our extras
for i, image in enumerate(response.data):
    path = out_dir / f"triangle-{i}.png"
    path.write_bytes(base64.b64decode(image.b64_json))
    print("wrote", path)
