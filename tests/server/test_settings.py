"""ServerSettings: TOML file < environment < keyword overrides; refused values."""

from __future__ import annotations

from pathlib import Path

import pytest
from accel_diffusion.server import ServerSettings
from pydantic import ValidationError


def test_precedence_file_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "server.toml"
    config.write_text('[server]\nport = 9000\nqueue_max = 7\nserved_models = ["shapes", "gmm"]\n'
                      'cors_origins = ["https://app.example"]\n')
    monkeypatch.setenv("ACCEL_DIFFUSION_QUEUE_MAX", "9")
    settings = ServerSettings.from_file(config, port=9100)
    assert settings.port == 9100 and settings.queue_max == 9 and settings.served_models == ["shapes", "gmm"]
    assert settings.cors_origins == ["https://app.example"] and settings.host == "127.0.0.1"
    assert isinstance(settings, ServerSettings) and type(settings) is ServerSettings


def test_defaults_and_limits() -> None:
    settings = ServerSettings()
    assert (settings.host, settings.port, settings.served_models) == ("127.0.0.1", 8000, ["shapes"])
    limits = settings.request_limits()
    assert limits.max_steps == settings.max_steps and limits.max_images == settings.max_images


@pytest.mark.parametrize("bad", [{"cors_origins": ["*"]}, {"port": 0}, {"served_models": []}, {"unknown": 1},
                                 {"api_keys": ["good", " "]}])  # a blank key would match "Bearer " alone
def test_refused_settings(bad: dict) -> None:
    with pytest.raises(ValidationError):
        ServerSettings(**bad)


def test_secret_keys_do_not_leak_into_repr(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k1\n\nk2\n")
    settings = ServerSettings(api_keys=["inline"], api_keys_file=keys)
    assert settings.all_api_keys() == ["inline", "k1", "k2"] and "inline" not in repr(settings)


def test_the_servers_default_limits_are_the_librarys() -> None:
    """One definition: a request the CLI or Python API accepts by default, a default server accepts too."""
    from accel_diffusion.strategy import DEFAULT_LIMITS

    assert ServerSettings().request_limits() == DEFAULT_LIMITS
    assert (DEFAULT_LIMITS.max_width, DEFAULT_LIMITS.max_height, DEFAULT_LIMITS.max_steps) == (1024, 1024, 150)


def test_served_hosts_default_to_the_loopback_names_when_bound_to_loopback() -> None:
    loopback = ["127.0.0.1", "localhost", "::1", "[::1]"]
    assert [ServerSettings(host=h).served_hosts() for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2")] == \
        [loopback] * 4
    assert ServerSettings(host="0.0.0.0").served_hosts() == ["*"]
    assert ServerSettings(host="0.0.0.0", allowed_hosts=["gen.example.com"]).served_hosts() == ["gen.example.com"]


@pytest.mark.parametrize(("bad", "named"), [
    ({"allowed_hosts": ["https://gen.example.com"]}, "without scheme"),
    ({"allowed_hosts": ["gen.example.com:8000"]}, "without scheme, path or port"),
    ({"allowed_hosts": [""]}, "host names"),
    ({"allowed_origins": ["*"]}, "wildcards are refused"),
    ({"allowed_origins": ["gen.example.com"]}, "scheme://name[:port]"),
    ({"allowed_origins": ["https://gen.example.com/web/"]}, "scheme://name[:port]")])
def test_refused_hosts_and_origins_say_what_to_give(bad: dict, named: str) -> None:
    with pytest.raises(ValidationError) as refused:
        ServerSettings(**bad)
    assert named in str(refused.value) and next(iter(bad)) in str(refused.value)
