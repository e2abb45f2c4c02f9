"""Configuration: the old variable names work, flags > env > TOML, errors name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from importer.config import ConfigError, load_settings


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "import").mkdir()
    return {
        "IMPORT_DIR": str(tmp_path / "import"),
        "ARCHIVE_DIR": str(tmp_path / "archived"),
        "FAILED_DIR": str(tmp_path / "failed"),
        "LOG_DIR": str(tmp_path / "log"),
        "STATE_DIR": str(tmp_path / "state"),
    }


def test_old_scripts_defaults_and_variables(env: dict[str, str]) -> None:
    settings = load_settings({}, env)
    (primary,) = settings.destinations
    assert (primary.host, primary.port, primary.called_aet) == ("127.0.0.1", 11112, "DCM4CHEE")
    assert settings.delay == 180
    env |= {"PACS_SERVER_IP": "10.0.0.5", "PACS_SERVER_PORT": "104", "PACS_AET": "MAINPACS",
            "BACKUP_PACS_IP": "10.0.0.6", "BACKUP_PACS_PORT": "11113",
            "BACKUP_PACS_AET": "BACKUP", "DELAY": "30", "CALLING_AET": "IMPORTER"}
    settings = load_settings({}, env)
    assert [(d.name, d.label, d.calling_aet) for d in settings.destinations] == [
        ("primary", "MAINPACS@10.0.0.5:104", "IMPORTER"),
        ("backup", "BACKUP@10.0.0.6:11113", "IMPORTER"),
    ]
    assert settings.delay == 30
    for key in ("archive_dir", "failed_dir", "log_dir", "state_dir"):
        assert getattr(settings, key).is_dir()  # created at start


def test_flags_override_env_override_toml(env: dict[str, str], tmp_path: Path) -> None:
    toml = tmp_path / "importer.toml"
    toml.write_text(
        'delay = 60\nassociations = 2\n'
        '[[destination]]\nname = "primary"\nhost = "pacs.example"\nport = 4242\naet = "TOML"\n'
        '[[destination]]\nname = "research"\nhost = "10.1.1.1"\nport = 104\naet = "RESEARCH"\n'
        'required = false\n'
    )
    settings = load_settings({}, env, str(toml))
    assert settings.delay == 60
    assert [(d.label, d.required, d.associations) for d in settings.destinations] == [
        ("TOML@pacs.example:4242", True, 2), ("RESEARCH@10.1.1.1:104", False, 2)]
    env["PACS_AET"] = "ENVAET"
    env["DELAY"] = "90"
    settings = load_settings({}, env, str(toml))
    assert settings.destinations[0].label == "ENVAET@pacs.example:4242"
    assert settings.delay == 90
    settings = load_settings({"pacs": "FLAG@127.0.0.1:11112", "associations": 8}, env, str(toml))
    assert settings.destinations[0].label == "FLAG@127.0.0.1:11112"
    assert settings.destinations[0].associations == 8


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PACS_SERVER_PORT", "abc", "PACS_SERVER_PORT: 'abc' is not a port number"),
        ("PACS_SERVER_PORT", "70000", "PACS_SERVER_PORT: 70000 is not a port number"),
        ("PACS_AET", "A" * 17, "PACS_AET: AE title 'AAAAAAAAAAAAAAAAA' is longer than 16"),
        ("PACS_AET", "   ", "PACS_AET: an AE title cannot be empty"),
        ("BACKUP_PACS_AET", "BAD\\AET", "BACKUP_PACS_AET: AE title"),
        ("CALLING_AET", "홍길동", "CALLING_AET: AE title"),
        ("PACS_SERVER_IP", "host; rm -rf /", "PACS_SERVER_IP"),
        ("DELAY", "-1", "DELAY: -1 is not a whole number"),
        ("FOLDER_PATTERN", "^#(\\d+)-(.+)$", "FOLDER_PATTERN: needs named groups"),
        ("FOLDER_PATTERN", "^#(?P<id>", "FOLDER_PATTERN: not a valid regular expression"),
        ("MIXED_PATIENTS", "maybe", "MIXED_PATIENTS: 'maybe' must be one of hold, warn, allow"),
        ("LOG_PATIENT_NAMES", "perhaps", "LOG_PATIENT_NAMES"),
        ("UNPACK_MAX_FILES", "0", "UNPACK_MAX_FILES: 0 is not a whole number"),
        ("UNPACK_MAX_BYTES", "lots", "UNPACK_MAX_BYTES: 'lots' is not a size in bytes"),
        ("UNPACK_MAX_BYTES", "10K", "UNPACK_MAX_BYTES: '10K' is not between 1M and 1024T"),
        ("UNPACK_MAX_RATIO", "1", "UNPACK_MAX_RATIO: 1 is not a whole number"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str, value: str,
                                      message: str) -> None:
    env[variable] = value
    with pytest.raises(ConfigError) as caught:
        load_settings({}, env)
    assert message in str(caught.value)


def test_unpack_limits(env: dict[str, str]) -> None:
    settings = load_settings({}, env)
    assert (settings.unpack_max_files, settings.unpack_max_bytes, settings.unpack_max_ratio) == (
        50_000, 20 << 30, 100)
    env |= {"UNPACK_MAX_FILES": "100", "UNPACK_MAX_BYTES": "500M", "UNPACK_MAX_RATIO": "1000"}
    settings = load_settings({}, env)
    assert (settings.unpack_max_files, settings.unpack_max_bytes, settings.unpack_max_ratio) == (
        100, 500 << 20, 1000)
    env["UNPACK_MAX_BYTES"] = "2GiB"
    assert load_settings({}, env).unpack_max_bytes == 2 << 30
    env["UNPACK_MAX_BYTES"] = "3000000"
    assert load_settings({}, env).unpack_max_bytes == 3_000_000


def test_missing_import_dir_is_named(env: dict[str, str], tmp_path: Path) -> None:
    env["IMPORT_DIR"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"IMPORT_DIR: .*nowhere does not exist"):
        load_settings({}, env)
    with pytest.raises(ConfigError, match=r"--import-dir: .*elsewhere does not exist"):
        load_settings({"import_dir": str(tmp_path / "elsewhere")}, env)


def test_unwritable_archive_dir_is_named(env: dict[str, str]) -> None:
    env["ARCHIVE_DIR"] = "/proc/importer-archive"  # not creatable, even by root
    with pytest.raises(ConfigError, match="ARCHIVE_DIR: cannot create /proc/importer-archive"):
        load_settings({}, env)


def test_archive_dir_that_is_a_file_is_named(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    env["ARCHIVE_DIR"] = str(tmp_path / "afile")
    with pytest.raises(ConfigError, match="ARCHIVE_DIR"):
        load_settings({}, env)


def test_bad_toml_is_named(env: dict[str, str], tmp_path: Path) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text("delay = [unclosed\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_settings({}, env, str(toml))
    toml.write_text('[[destination]]\nname = "x"\nhost = "h"\nport = "no"\naet = "A"\n')
    with pytest.raises(ConfigError, match="destination 'x' port in .*bad.toml"):
        load_settings({}, env, str(toml))


def test_dry_run_creates_no_directories(env: dict[str, str], tmp_path: Path) -> None:
    load_settings({"dry_run": True}, env)
    assert not (tmp_path / "archived").exists()
