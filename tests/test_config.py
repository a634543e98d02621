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
