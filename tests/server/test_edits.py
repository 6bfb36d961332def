"""POST /v1/images/edits: img2img from an OpenAI multipart form, a JSON body, and the openai package."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from openai import OpenAI
from server_clients import decode, init_png

from accel_diffusion.engine import Engine
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest

PROMPT = "a yellow triangle on a black background"


def expected(models_file: Path, **fields: object) -> np.ndarray:
    request = GenerationRequest.create(model="tiny", prompt=PROMPT, init_image=init_png(), **fields)
    return Engine(ModelRegistry.from_file(models_file)).generate(request).to_uint8()


def test_multipart_form_is_img2img(client: TestClient, tiny_models_file: Path) -> None:
    response = client.post("/v1/images/edits", files={"image": ("in.png", init_png(), "image/png")}, data={
        "prompt": PROMPT, "n": "2", "seed": "9", "strength": "0.6", "num_inference_steps": "5",
        "strategy": '{"sampler": {"name": "hb", "beta": 0.8}}'})
    assert response.status_code == 200, response.text
    images = np.stack([decode(d["b64_json"]) for d in response.json()["data"]])
    reference = expected(tiny_models_file, n=2, seed=9, strength=0.6, steps=5,
                         strategy={"sampler": {"name": "hb", "beta": 0.8}})
    assert np.array_equal(images, reference)
    assert response.json()["usage"]["nfe_per_image"] == 2 * 3  # int(0.6 x 5) steps, cond + uncond


def test_json_body_with_base64_image(client: TestClient, tiny_models_file: Path) -> None:
    response = client.post("/v1/images/edits", json={
        "image": base64.b64encode(init_png()).decode(), "prompt": PROMPT, "seed": 1, "num_inference_steps": 4})
    assert response.status_code == 200, response.text
    assert np.array_equal(decode(response.json()["data"][0]["b64_json"]),
                          expected(tiny_models_file, seed=1, steps=4)[0])


def test_the_openai_package_edits(client: TestClient) -> None:
    openai_client = OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client)
    result = openai_client.images.edit(image=("in.png", init_png(), "image/png"), prompt=PROMPT, model="tiny",
                                       extra_body={"seed": 2, "num_inference_steps": 3})
    assert decode(result.data[0].b64_json).shape == (32, 32, 3)


def test_edit_errors_name_the_field(client: TestClient) -> None:
    cases = [
        ({"json": {"image": "not base64!", "prompt": "a"}}, "image"),
        ({"json": {"image": base64.b64encode(b"not an image").decode(), "prompt": "a"}}, "init_image"),
        ({"json": {"image": base64.b64encode(init_png()).decode(), "prompt": "a", "mask": "x"}}, "mask"),
        ({"json": {"image": base64.b64encode(init_png()).decode(), "prompt": "a", "strength": 2}}, "strength"),
        ({"files": {"image": ("in.png", init_png(), "image/png")}, "data": {}}, "prompt"),
    ]
    for kwargs, param in cases:
        response = client.post("/v1/images/edits", **kwargs)
        assert response.status_code == 400, (param, response.text)
        assert response.json()["error"]["param"] == param, response.text
