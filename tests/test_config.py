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


def test_unknown_flywheel_variable_stops_start_up_with_a_suggestion(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(FLYWHEEL_HOME=str(tmp_path), FLYWHEEL_GRPC_PORT="0", FLYWHEEL_METRICS_PORT="0",
               FLYWHEEL_CACHE=str(tmp_path),  # read by the Makefile, not a setting: allowed
               FLYWHEEL_GRPC_PROT="50099")  # the typo
    # were the typo ignored, the service would start (and this would time out)
    result = subprocess.run([sys.executable, "-m", "flywheel.cli", "serve", "preference"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "FLYWHEEL_GRPC_PROT: did you mean FLYWHEEL_GRPC_PORT?" in result.stderr
    assert "FLYWHEEL_CACHE" not in result.stderr


def test_known_and_tool_variables_pass_the_environment_check() -> None:
    from flywheel.docs import known_env_names
    from flywheel.runtime.config import UnknownSettingError, check_environment

    known = known_env_names()
    check_environment(known, {"FLYWHEEL_REWARD_MAX_BATCH_SIZE": "8", "FLYWHEEL_TRAINER_TARGET": "x", "PATH": "/"})
    with pytest.raises(UnknownSettingError, match="FLYWHEEL_REWARD_HOT_RELOAD: did you mean "
                                                  "FLYWHEEL_REWARD_RELOAD_ENABLED"):
        check_environment(known, {"FLYWHEEL_REWARD_HOT_RELOAD": "false"})


def test_settings_env_names_variables_from_the_fields() -> None:
    from flywheel.runtime.config import settings_env
    from flywheel.trainer.settings import TrainerSettings

    env = settings_env(TrainerSettings, trainer_batch_size=8, trainer_start_paused=True)
    assert env == {"FLYWHEEL_TRAINER_BATCH_SIZE": "8", "FLYWHEEL_TRAINER_START_PAUSED": "true"}
    parsed = TrainerSettings(_env_file=None, **{k[len("FLYWHEEL_"):].lower(): v for k, v in env.items()})
    assert parsed.trainer_start_paused and parsed.trainer_batch_size == 8
    with pytest.raises(KeyError, match="did you mean 'trainer_batch_size'"):
        settings_env(TrainerSettings, trainer_batchsize=8)


def test_ppo_settings_are_generated_from_the_one_ppo_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from flywheel.docs import known_env_names
    from flywheel.runtime.config import UnknownSettingError, check_environment, settings_env
    from flywheel.trainer.ppo_config import PPOConfig
    from flywheel.trainer.settings import TrainerSettings

    for name, info in PPOConfig.model_fields.items():  # same type, default, bounds and docs
        setting = TrainerSettings.model_fields[f"trainer_{name}"]
        assert (setting.annotation, setting.default, setting.metadata, setting.description) == (
            info.annotation, info.default, info.metadata, info.description), name
    chosen = dict(trainer_kl_coef=0.3, trainer_adam_betas=(0.8, 0.9), trainer_sampler_correction="none")
    for variable, value in settings_env(TrainerSettings, **chosen).items():
        monkeypatch.setenv(variable, value)
    assert TrainerSettings().ppo_config() == PPOConfig(kl_coef=0.3, adam_betas=(0.8, 0.9), sampler_correction="none")
    monkeypatch.setenv("FLYWHEEL_TRAINER_CLIPRANGE", "0")
    with pytest.raises(ValidationError, match="trainer_cliprange"):
        TrainerSettings()

    known = known_env_names()
    check_environment(known, {"FLYWHEEL_TRAINER_KL_COEF": "0.1", "FLYWHEEL_TRAINER_TIS_CAP": "3"})
    with pytest.raises(UnknownSettingError, match="FLYWHEEL_TRAINER_KL_COEFF: did you mean FLYWHEEL_TRAINER_KL_COEF"):
        check_environment(known, {"FLYWHEEL_TRAINER_KL_COEFF": "0.1"})
