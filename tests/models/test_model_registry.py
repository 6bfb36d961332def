"""Model registry: TOML declarations, sources, safe loading (safetensors only), offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_spec

from accel_diffusion.errors import InvalidRequestError, ModelLoadError, UnknownModelError
from accel_diffusion.models.loading import load_pipeline, resolve_device_dtype
from accel_diffusion.models.registry import BUILTIN_DIR, ModelRegistry


def test_default_registry_declares_the_builtins() -> None:
    registry = ModelRegistry.default()
    assert registry.ids() == ["gmm", "shapes", "shapes_disback", "shapes_fdistill", "shapes_mar",
                              "shapes_slimflow"]
    shapes = registry.spec("shapes")
    assert shapes.location() == str(BUILTIN_DIR / "shapes")
    assert shapes.default_strategy.sampler["name"] == "dpmpp_2m"
    assert shapes.default_strategy.guidance == {"name": "cfg", "scale": 5.0, "rescale": 0.0, "start": 0.0, "stop": 1.0}
    for model_id in registry.ids():
        location = registry.spec(model_id).location()
        assert Path(location, "model_index.json").is_file() or Path(location, "mar_config.json").is_file(), model_id
    assert shapes.tiny_vae_location() == str(BUILTIN_DIR / "shapes_tiny_vae")
    assert registry.spec("gmm").tiny_vae_location() is None


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_tiny_vae_locations_and_loading(tmp_path: Path, tiny_sd_dir: Path) -> None:
    from diffusers import AutoencoderTiny

    assert tiny_spec("a", tiny_sd_dir, tiny_vae="madebyollin/taesd").tiny_vae_location() == "madebyollin/taesd"
    matching = tmp_path / "taesd"
    AutoencoderTiny(encoder_block_out_channels=(8,) * 3, decoder_block_out_channels=(8,) * 3,
                    num_encoder_blocks=(0, 1, 1), num_decoder_blocks=(1, 1, 0), latent_channels=4,
                    ).save_pretrained(matching, safe_serialization=True)
    spec = tiny_spec("with-tiny", tiny_sd_dir, tiny_vae=str(matching))
    assert spec.tiny_vae_location() == str(matching)
    loaded = load_pipeline(spec)
    assert isinstance(loaded.tiny_vae, AutoencoderTiny) and not loaded.tiny_vae.training
    assert not any(p.requires_grad for p in loaded.tiny_vae.parameters())
    assert load_pipeline(tiny_spec("without", tiny_sd_dir)).tiny_vae is None
    wrong = tmp_path / "taesd16"
    AutoencoderTiny(encoder_block_out_channels=(8,) * 3, decoder_block_out_channels=(8,) * 3,
                    num_encoder_blocks=(0, 1, 1), num_decoder_blocks=(1, 1, 0), latent_channels=16,
                    ).save_pretrained(wrong, safe_serialization=True)
    with pytest.raises(ModelLoadError, match="does not match"):
        load_pipeline(tiny_spec("wrong", tiny_sd_dir, tiny_vae=str(wrong)))
    with pytest.raises(ModelLoadError, match="tiny_vae could not be loaded"):
        load_pipeline(tiny_spec("missing", tiny_sd_dir, tiny_vae="nobody/no-such-taesd"))


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(UnknownModelError) as err:
        ModelRegistry.default().spec("sd-turbo")
    assert err.value.field == "model" and err.value.allowed == ("'gmm', 'shapes', 'shapes_disback', 'shapes_fdistill', "
                                                         "'shapes_mar', 'shapes_slimflow'")


def test_registry_file_validation(tmp_path: Path) -> None:
    bad = tmp_path / "models.toml"
    bad.write_text('[models.x]\nsource = "hub"\n')
    with pytest.raises(InvalidRequestError, match="needs 'hub_id'"):
        ModelRegistry.from_file(bad)
    bad.write_text('[models.x]\nsource = "local"\npath = "/x"\ndefault_strategy = { sampler = "nope" }\n')
    with pytest.raises(InvalidRequestError) as err:
        ModelRegistry.from_file(bad)
    assert err.value.field == "models.x.default_strategy.sampler.name"
    bad.write_text('[models.x]\nsource = "local"\npath = "/x"\ndevice = "banana"\n')
    with pytest.raises(InvalidRequestError) as err:
        ModelRegistry.from_file(bad)
    assert err.value.field == "models.x.device" and "'cuda:N'" in err.value.message
    for text in ("models = 3\n", '[models]\nx = "y"\n'):
        bad.write_text(text)
        with pytest.raises(InvalidRequestError, match=r"\[models.<id>\] table"):
            ModelRegistry.from_file(bad)
    bad.write_text("not toml [")
    with pytest.raises(InvalidRequestError, match="not valid TOML"):
        ModelRegistry.from_file(bad)
    with pytest.raises(InvalidRequestError, match="does not exist"):
        ModelRegistry.from_file(tmp_path / "missing.toml")
    with pytest.raises(InvalidRequestError, match="cannot be read"):
        ModelRegistry.from_file(tmp_path)  # a directory
    bad.write_bytes(b"\xff\xfe[models.x]")
    with pytest.raises(InvalidRequestError, match="cannot be read"):
        ModelRegistry.from_file(bad)
    bad.write_text('[models.a]\nid = "b"\nsource = "local"\npath = "/a"\n[models.b]\nsource = "local"\npath = "/b"\n')
    with pytest.raises(InvalidRequestError) as err:
        ModelRegistry.from_file(bad)
    assert err.value.field == "models.a.id"
    bad.write_text('[models.x]\nsource = "local"\npath = "/x"\ndefault_width = -64\n')
    with pytest.raises(InvalidRequestError) as err:
        ModelRegistry.from_file(bad)
    assert err.value.field == "models.x.default_width"


@pytest.mark.parametrize(("value", "offline"), [("1", True), ("true", True), ("ON", True), ("yes", True),
                                                ("0", False), ("no", False), ("off", False), ("FALSE", False),
                                                ("", False)])
def test_hf_hub_offline_is_read_as_huggingface_hub_reads_it(monkeypatch: pytest.MonkeyPatch, value: str,
                                                            offline: bool) -> None:
    from accel_diffusion.models.loading import hub_offline

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is offline


def test_a_malformed_model_index_is_a_load_error(tmp_path: Path, tiny_sd_dir: Path) -> None:
    copy = tmp_path / "broken"
    shutil.copytree(tiny_sd_dir, copy)
    (copy / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"not a valid model_index\.json"):
        load_pipeline(tiny_spec("broken", copy))


def test_hub_spec_and_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_sd_dir: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[models.sd15]\nsource = "hub"\nhub_id = "stable-diffusion-v1-5/stable-diffusion-v1-5"\n'
        'revision = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"\n'
        'default_strategy = { sampler = "dpmpp_2m", schedule = "spacing", guidance = { name = "cfg", scale = 7.5 } }\n'
        f'[models.tiny]\nsource = "local"\npath = "{tiny_sd_dir}"\n'
    )
    monkeypatch.setenv("ACCEL_DIFFUSION_MODELS", str(path))
    registry = ModelRegistry.from_file()
    assert registry.ids() == ["sd15", "tiny"]
    assert registry.spec("sd15").location() == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    # offline: a hub id that is not in the local cache fails fast with a clear error, no network
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        registry.get("sd15")
    assert registry.get("tiny") is registry.get("tiny")  # loaded once


def test_auto_device_and_dtype() -> None:
    spec = tiny_spec("t", Path("/x"))
    device, dtype = resolve_device_dtype(spec)
    if torch.cuda.is_available():
        assert (device.type, dtype) == ("cuda", torch.float16)
    else:
        assert (device.type, dtype) == ("cpu", torch.float32)
    assert resolve_device_dtype(spec.model_copy(update={"dtype": "bfloat16"}))[1] == torch.bfloat16


def test_pickle_only_weights_are_refused(tmp_path: Path, tiny_sd_dir: Path) -> None:
    copy = tmp_path / "pickled"
    shutil.copytree(tiny_sd_dir, copy)
    for weights in copy.rglob("*.safetensors"):
        state = __import__("safetensors.torch", fromlist=["load_file"]).load_file(weights)
        torch.save(state, weights.with_suffix(".bin"))
        weights.unlink()
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        load_pipeline(tiny_spec("pickled", copy))


def test_missing_directory_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(tiny_spec("gone", tmp_path / "gone"))


def test_loads_local_dir_offline_with_sdpa(tiny_sd) -> None:
    assert tiny_sd.family == "sd" and tiny_sd.attention_backend == "sdpa"
    assert tiny_sd.device.type == "cpu" and tiny_sd.dtype == torch.float32
    assert not any(p.requires_grad for p in tiny_sd.pipeline.unet.parameters())
    assert tiny_sd.describe()["id"] == "tiny-sd"


def test_xformers_preference_falls_back_to_sdpa_without_cuda(tiny_sd_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    model = load_pipeline(tiny_spec("x", tiny_sd_dir, attention="xformers"))
    assert model.attention_backend == "sdpa"
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(p, AttnProcessor2_0) for p in model.pipeline.unet.attn_processors.values())


def test_cuda_device_without_cuda_is_a_load_error(tiny_sd_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(ModelLoadError, match="no CUDA device is available"):
        load_pipeline(tiny_spec("gpu", tiny_sd_dir, device="cuda"))
    if not torch.backends.mps.is_available():
        with pytest.raises(ModelLoadError, match="MPS is not available"):
            load_pipeline(tiny_spec("mac", tiny_sd_dir, device="mps"))


def test_unsupported_pipelines_are_refused(tmp_path: Path) -> None:
    from tiny_pipelines import build_tiny_sd, save

    pipe = build_tiny_sd()
    from diffusers import UNet2DConditionModel

    config = dict(pipe.unet.config)
    config["in_channels"] = 9  # an inpainting-style UNet (latents + mask + masked image)
    pipe.register_modules(unet=UNet2DConditionModel.from_config(config))
    save(pipe, tmp_path / "inpaint")
    with pytest.raises(ModelLoadError, match="not a supported pipeline"):
        load_pipeline(tiny_spec("inpaint", tmp_path / "inpaint"))
