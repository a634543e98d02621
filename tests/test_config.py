"""Settings come from FLYWHEEL_* environment variables; the docs table is generated from them."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from flywheel.docs import configuration_markdown, env_names, settings_classes
from flywheel.runtime.config import ServiceSettings

REPO = Path(__file__).resolve().parents[1]


def test_settings_read_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_GRPC_PORT", "6000")
    monkeypatch.setenv("FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS", "a:1, b:2")
    monkeypatch.setenv("FLYWHEEL_SHUTDOWN_GRACE_S", "3.5")
    s = ServiceSettings()
    assert s.grpc_port == 6000
    assert s.bootstrap_servers == ["a:1", "b:2"]
    assert s.shutdown_grace_s == 3.5


def test_invalid_setting_is_rejected_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_GRPC_PORT", "70000")
    with pytest.raises(ValidationError, match="grpc_port"):
        ServiceSettings()


def test_every_setting_is_documented() -> None:
    classes = [ServiceSettings, *settings_classes().values()]
    for cls in classes:
        for name, info in cls.model_fields.items():
            assert info.description, f"{cls.__name__}.{name} has no description"
    text = configuration_markdown()
    for cls in classes:
        for env in env_names(cls):
            assert f"`{env}`" in text


def test_configuration_doc_is_up_to_date() -> None:
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == configuration_markdown(), "run `make config-docs` (flywheel config-docs > docs/configuration.md)"


def test_relative_paths_resolve_against_the_start_directory_once(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """A relative FLYWHEEL_HOME (or any path setting) means "below the directory the service was
    started from", fixed at start: the same directory whatever the working directory is later."""
    from flywheel.preference.settings import PreferenceSettings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLYWHEEL_HOME", "runs/demo/home")
    monkeypatch.setenv("FLYWHEEL_PREFERENCE_EXPORT_DIR", "exports")
    settings = PreferenceSettings()
    assert settings.home == tmp_path / "runs" / "demo" / "home"
    assert settings.export_dir() == tmp_path / "exports"
    monkeypatch.chdir(tmp_path / "..")
    assert settings.auth_db_path() == tmp_path / "runs" / "demo" / "home" / "preference" / "auth.sqlite"
