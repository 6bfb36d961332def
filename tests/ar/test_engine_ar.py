"""An AR model served by the engine like any model (ar/generate.py): a tiny random-weight MAR directory on the
shipped ``shapes`` text encoder and VAE, loaded by the real loading path; the result reports the head steps per
AR iteration and their sum; what an AR model cannot do is refused with a 400-style error naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_mar import tiny_mar_dir  # noqa: F401  (the fixture)

from accel_diffusion.ar.masking import head_cost
from accel_diffusion.ar.pipeline import MarPipeline
from accel_diffusion.engine import Engine
from accel_diffusion.engine.engine import check_request
from accel_diffusion.engine.hooks import GenerationHooks, StepEvent
from accel_diffusion.errors import IncompatibleStrategyError, InvalidRequestError, ModelLoadError
from accel_diffusion.models.registry import ModelRegistry, ModelSpec
from accel_diffusion.strategy import GenerationRequest

pytestmark = pytest.mark.usefixtures("single_thread")

STRATEGY = {"sampler": {"name": "ddpm"}, "schedule": {"name": "spacing"}, "guidance": {"name": "cfg", "scale": 3.0}}


@pytest.fixture(scope="module")
def engine(tiny_mar_dir: Path) -> Engine:  # noqa: F811
    specs = [ModelSpec(id="tiny_mar", source="local", path=str(tiny_mar_dir), default_steps=4,
                       default_strategy=STRATEGY), ModelRegistry.default().spec("shapes")]
    return Engine(ModelRegistry(specs))


def request(**fields: object) -> GenerationRequest:
    return GenerationRequest.model_validate({"model": "tiny_mar", "prompt": "a red circle on a blue background",
                                             "seed": 3, **fields})


def test_disa_generation_reports_head_steps(engine: Engine) -> None:
    events: list[StepEvent] = []
    strategy = {"schedule": {"name": "disa", "upper": 9, "lower": 2, "kind": "linear"}}
    result = engine.generate(request(n=2, strategy=strategy), GenerationHooks(on_step=events.append))
    ar = result.extra["ar"]
    plan = [9, 7, 6, 4, 3, 2]  # 2 + floor((5 - k)/5 * 7)
    token_steps, total = head_cost(16, plan)
    assert ar["head_steps"] == plan and ar["head_steps_total"] == total == result.steps == 31
    assert ar["head_nfe"] == 2 * 31 and ar["head_token_evals"] == 2 * token_steps and ar["transformer_nfe"] == 12
    assert result.nfe == 2 * 31 + 12
    assert result.images.shape == (2, 32, 32, 3) and result.images.dtype.name == "float32"
    assert [(e.step, e.total) for e in events] == [(k, 6) for k in range(1, 7)]
    assert result.strategy.schedule == {"name": "disa", "upper": 9, "lower": 2, "kind": "linear"}


def test_constant_head_and_equal_disa_bounds_give_the_same_images(engine: Engine) -> None:
    constant = engine.generate(request(steps=5))
    annealed = engine.generate(request(strategy={"schedule": {"name": "disa", "upper": 5, "lower": 5}}))
    assert constant.extra["ar"]["head_steps"] == annealed.extra["ar"]["head_steps"] == [5] * 6
    assert (constant.images == annealed.images).all()
    default = engine.generate(request())
    assert default.extra["ar"]["head_steps"] == [4] * 6  # the model's default_steps at every iteration


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"strategy": {"schedule": {"name": "karras"}}}, "strategy.schedule.name", "'disa'"),
        ({"strategy": {"schedule": {"name": "spacing", "spacing": "trailing"}}}, "strategy.schedule.name", "'spacing'"),
        ({"strategy": {"schedule": {"name": "disa"}}, "steps": 10}, "steps", "leave steps out"),
        ({"width": 64}, "width", "32x32"),
    ],
)
def test_what_an_ar_model_cannot_do_is_refused_at_the_edge(engine: Engine, fields: dict, field: str,
                                                           words: str) -> None:
    spec = engine.models.spec("tiny_mar")
    with pytest.raises(InvalidRequestError) as info:
        check_request(spec, request(**fields))
    assert info.value.field == field and words in info.value.message


def test_disa_is_refused_by_an_image_model_and_validated(engine: Engine) -> None:
    with pytest.raises(IncompatibleStrategyError) as info:
        check_request(engine.models.spec("shapes"), request(model="shapes", strategy={"schedule": "disa"}))
    assert info.value.field == "strategy.schedule.name"
    with pytest.raises(InvalidRequestError) as bad:
        request(strategy={"schedule": {"name": "disa", "upper": 5, "lower": 50}})
    assert bad.value.field == "strategy.schedule.lower"


def test_a_changed_base_model_is_refused(tiny_mar_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    import json
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_mar_dir, copy)
    config = json.loads((copy / "mar_config.json").read_text())
    config["base_sha256"]["vae/diffusion_pytorch_model.safetensors"] = "0" * 64
    (copy / "mar_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="retrain"):
        MarPipeline.from_pretrained(copy)
