"""Strategy and GenerationRequest: validation at the edge, with the field and range named."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from accel_diffusion.errors import InvalidRequestError, UnknownComponentError
from accel_diffusion.strategy import GenerationRequest, RequestLimits, Strategy


def test_strategy_json_round_trip_and_resolution() -> None:
    strategy = Strategy.parse('{"sampler": {"name": "ddim", "eta": 0.5}}')
    assert strategy.sampler == {"name": "ddim", "eta": 0.5}
    assert Strategy.parse(strategy.to_json()) == strategy
    default = Strategy.parse({"sampler": "dpmpp_2m", "schedule": "spacing", "guidance": {"name": "cfg", "scale": 5}})
    resolved = strategy.resolved_over(default)
    assert resolved.sampler == {"name": "ddim", "eta": 0.5}
    assert resolved.guidance == {"name": "cfg", "scale": 5.0, "rescale": 0.0, "start": 0.0, "stop": 1.0}
    assert resolved.schedule == {"name": "spacing", "spacing": "model"}


def test_strategy_rejects_unknown_kind_and_bad_json() -> None:
    with pytest.raises(InvalidRequestError) as err:
        Strategy.parse({"samplr": "ddim"})
    assert err.value.field == "strategy.samplr"
    with pytest.raises(InvalidRequestError) as err:
        Strategy.parse("{not json")
    assert err.value.field == "strategy"
    with pytest.raises(InvalidRequestError) as err:  # json.loads alone: RecursionError
        Strategy.parse('{"sampler": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert err.value.field == "strategy" and "100001 levels deep; at most 32 allowed" in err.value.message
    with pytest.raises(UnknownComponentError) as err:
        Strategy.parse({"student": {"name": "fdistill"}})
    assert "unknown student 'fdistill'" in err.value.message and "'one_step'" in str(err.value.allowed)


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"width": 33}, "width", "multiple of 8 between 8 and 1024"),
        ({"height": 4096}, "height", "multiple of 8 between 8 and 1024"),
        ({"steps": 0}, "steps", "between 1 and 150"),
        ({"steps": 151}, "steps", "between 1 and 150"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"n": 65}, "n", "at most 64"),
        ({"strength": 1.5}, "strength", "<= 1.0"),
        ({"strength": -0.1}, "strength", ">= 0.0"),
        ({"strength": float("nan")}, "strength", "finite"),
        ({"seed": -1}, "seed", ">= 0"),
        ({"prompt": []}, "prompt", "at least one prompt"),
        ({"prompt": "x" * 3000}, "prompt", "at most 2000"),
        ({"init_image": "/nonexistent/image.png"}, "init_image", "does not exist"),
        ({"init_image": b"not an image"}, "init_image", "cannot be read as an image"),
        ({"strategy": {"guidance": {"name": "cfg", "scale": float("nan")}}}, "strategy.guidance.scale", "finite"),
        ({"strategy": {"guidance": {"name": "cfg", "scale": -2}}}, "strategy.guidance.scale", ">= 0.0"),
        ({"bogus": 1}, "bogus", "unknown field"),
    ],
)
def test_bad_requests_name_field_and_range(fields: dict, field: str, fragment: str) -> None:
    data = {"prompt": "a red circle on a blue background", **fields}
    with pytest.raises(InvalidRequestError) as err:
        GenerationRequest.from_dict(data)
    assert err.value.field == field
    assert fragment in str(err.value)


def test_limits_are_configurable() -> None:
    limits = RequestLimits(max_width=64, max_steps=50, max_images=4)
    with pytest.raises(InvalidRequestError, match="between 8 and 64"):
        GenerationRequest.create(limits, prompt="a", width=128)
    with pytest.raises(InvalidRequestError, match="between 1 and 50"):
        GenerationRequest.create(limits, prompt="a", steps=60)
    with pytest.raises(InvalidRequestError, match="at most 4"):
        GenerationRequest.create(limits, prompt=["a", "b", "c"], n=2)
    assert GenerationRequest.create(limits, prompt=["a", "b"], n=2).num_images == 4


def test_init_image_from_bytes_path_and_pil(tmp_path: Path) -> None:
    array = (np.arange(16 * 16 * 3) % 256).astype(np.uint8).reshape(16, 16, 3)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    path = tmp_path / "init.png"
    path.write_bytes(buffer.getvalue())
    for source in (buffer.getvalue(), path, str(path), Image.fromarray(array).convert("RGBA")):
        request = GenerationRequest.create(prompt="a", init_image=source)
        assert np.array_equal(np.asarray(request.init_image), array)
    limits = RequestLimits(max_init_image_bytes=10)
    with pytest.raises(InvalidRequestError, match="at most 10 allowed"):
        GenerationRequest.create(limits, prompt="a", init_image=buffer.getvalue())


def test_init_image_size_is_limited_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buffer, format="PNG")
    with pytest.raises(InvalidRequestError) as err:
        GenerationRequest.create(RequestLimits(max_width=32), prompt="a", init_image=buffer.getvalue())
    assert err.value.field == "init_image" and "is 64x48; at most 32x1024" in err.value.message
    with pytest.raises(InvalidRequestError, match="at most 1024x1024 and 1000 pixels"):
        GenerationRequest.create(RequestLimits(max_pixels=1000), prompt="a", init_image=Image.new("RGB", (64, 48)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses > 2x this as a decompression bomb
    with pytest.raises(InvalidRequestError, match="too many pixels to decode safely"):
        GenerationRequest.create(prompt="a", init_image=buffer.getvalue())


@pytest.mark.parametrize(("fields", "field", "fragment"), [
    ({"size": "32x33"}, "size", "size: height must be a multiple of 8"),
    ({"size": "2048x2048"}, "size", "size: width must be a multiple of 8 between 8 and 1024"),
    ({"num_inference_steps": 151}, "num_inference_steps", "num_inference_steps: must be between 1 and 150"),
    ({"num_images_per_prompt": 65}, "num_images_per_prompt", "at most 64 per request"),
    ({"size": "32x32", "height": 32}, "size", "give either size or width/height, not both"),
    ({"steps": 2, "num_inference_steps": 2}, "num_inference_steps", "give either num_inference_steps or steps"),
    ({"stpes": 2}, "stpes", "stpes: unknown field; did you mean `steps`?"),
    ({"negative": "x"}, "negative", "did you mean `negative_prompt`?"),
])
def test_aliases_and_unknown_fields_are_named_as_sent(fields: dict, field: str, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        GenerationRequest.create(prompt="a", **fields)
    assert err.value.field == field and fragment in str(err.value)


def test_the_diffusers_and_openai_spellings_make_the_canonical_request() -> None:
    aliased = GenerationRequest.create(prompt="a", size="64x32", num_inference_steps=3, num_images_per_prompt=2)
    assert aliased == GenerationRequest.create(prompt="a", width=64, height=32, steps=3, n=2)
    assert GenerationRequest.create(prompt="a", size="auto") == GenerationRequest.create(prompt="a")


def test_an_unknown_component_parameter_suggests_the_meant_one() -> None:
    with pytest.raises(InvalidRequestError) as err:
        Strategy.parse({"sampler": {"name": "ddim", "etta": 1}})
    assert err.value.field == "strategy.sampler.etta" and "did you mean `eta`?" in err.value.message


@pytest.mark.parametrize(("fields", "field"), [
    ({"prompt": "a red \ud800 circle"}, "prompt"),
    ({"prompt": ["a red circle", "a \udcff cross"]}, "prompt.1"),  # undecodable argv bytes (surrogateescape)
    ({"negative_prompt": "\udfff"}, "negative_prompt"),
    ({"model": "shapes\ud800"}, "model"),
    ({"strategy": {"sampler": {"name": "ddim\ud800"}}}, "strategy.sampler.name"),
    ({"strategy": '{"schedule": {"name": "spacing", "spacing": "\\ud800"}}'}, "strategy.schedule.spacing"),
])
def test_text_that_cannot_be_encoded_is_refused_naming_the_field(fields: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        GenerationRequest.create(**{"prompt": "a red circle", **fields})
    assert err.value.field == field and "unpaired UTF-16 surrogate" in err.value.message
    str(err.value).encode("utf-8")  # the error itself can be printed and sent


def test_a_strategy_with_a_lone_surrogate_is_refused_in_python_too() -> None:
    with pytest.raises(InvalidRequestError) as err:
        Strategy.parse({"guidance": {"name": "cfg", "\ud800": 1.0}})
    assert err.value.field == "strategy.guidance.\ufffd" and "field name" in err.value.message
    surrogate_pair = GenerationRequest.create(prompt="a red circle \U0001f534")  # astral characters are fine
    assert surrogate_pair.prompt.endswith("\U0001f534")
