import subprocess
import sys

import pytest
from pydantic import SecretStr

from ouro.cli import ConfigError, load_settings
from ouro.settings import Settings


def test_defaults_point_at_the_bundled_model_and_the_data_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no stray .env
    settings = Settings()
    assert settings.model == "bundled"
    assert settings.db_path == settings.data_dir / "ouro.db"
    assert settings.tracking_uri.startswith("sqlite:///")
    assert settings.tracking_uri.endswith("mlflow.db")


def test_admin_ids_are_comma_separated(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OURO_DISCORD_ADMIN_IDS", "123, 456,")
    monkeypatch.setenv("OURO_TELEGRAM_ADMIN_IDS", "789")
    settings = Settings()
    assert settings.admin_ids("discord") == {"123", "456"}
    assert settings.admin_ids("telegram") == {"789"}
    assert settings.admin_ids("console") == set()


def test_dotenv_file_is_read(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("OURO_MAX_BATCH_SIZE=3\nOURO_TELEGRAM_TOKEN=abc:def\n")
    settings = Settings()
    assert settings.max_batch_size == 3
    assert isinstance(settings.telegram_token, SecretStr)


def test_secrets_never_appear_in_repr_or_dump(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OURO_DISCORD_TOKEN", "very-secret-discord")
    monkeypatch.setenv("OURO_ADMIN_TOKEN", "very-secret-admin")
    settings = Settings()
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert "very-secret" not in text
    assert settings.discord_token is not None
    assert settings.discord_token.get_secret_value() == "very-secret-discord"


def test_bad_setting_is_one_clear_error_naming_the_setting(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OURO_MAX_BATCH_SIZE", "many")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "OURO_MAX_BATCH_SIZE" in str(info.value.code)


def test_bad_setting_stops_the_cli_without_a_traceback(tmp_path):
    env = {"OURO_API_PORT": "70000", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "ouro", "export", "--user", "#1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "OURO_API_PORT" in lines[0]
    assert "Traceback" not in proc.stderr


def test_env_example_lists_every_setting():
    from pathlib import Path

    text = (Path(__file__).parents[2] / ".env.example").read_text()
    missing = [name for name in Settings.model_fields if f"OURO_{name.upper()}=" not in text]
    assert missing == []
