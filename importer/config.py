"""Settings from command-line flags, then environment, then an optional TOML file.

The old scripts' variable names (PACS_SERVER_IP, PACS_AET, BACKUP_PACS_*, DELAY) keep
working. Every value is checked once, at start, and a bad one is reported by the name
the user wrote it under — never as a traceback halfway through a batch.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from importer.folders import DEFAULT_PATTERN, PatternError, compile_pattern


class ConfigError(Exception):
    """A user error in the configuration; the message names the variable."""


@dataclass(frozen=True)
class Destination:
    name: str
    host: str
    port: int
    called_aet: str
    calling_aet: str = "STORESCU"
    required: bool = True
    associations: int = 4
    connect_timeout: int = 10
    acse_timeout: int = 30
    dimse_timeout: int = 120
    tls_key: Path | None = None  # our private key (PEM, unencrypted) ...
    tls_cert: Path | None = None  # ... and certificate, when the PACS wants client certs
    tls_ca: Path | None = None  # CA certificate(s) the PACS's certificate must chain to
    verify: str = "auto"  # ask the PACS back by C-FIND: auto (where it answers), c-find, none

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    @property
    def label(self) -> str:
        return f"{self.called_aet}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    import_dir: Path
    archive_dir: Path
    failed_dir: Path
    log_dir: Path
    state_dir: Path
    destinations: tuple[Destination, ...]
    folder_pattern: re.Pattern[str] = field(
        default_factory=lambda: compile_pattern(DEFAULT_PATTERN))
    delay: int = 180
    mixed_patients: str = "hold"
    reconcile: str = "hold"  # a folder whose identity conflicts with the site's: hold, warn
    reconcile_worklist: Destination | None = None  # a Modality Worklist SCP to ask as well
    max_attempts: int = 3  # refusals by a PACS before a file is quarantined
    verify_attempts: int = 3  # C-FIND queries before "acknowledged but not found"
    verify_delay: int = 2  # seconds between them (some PACS index asynchronously)
    log_retention_days: int = 30  # 0 keeps logs forever
    archive_retention_days: int = 90  # 0 keeps archives forever
    log_patient_names: bool = True
    settle_seconds: int = 5  # a file changed more recently than this is still being written
    incomplete_grace: int = 3600  # an unreadable file unchanged this long is broken, not late
    duplicate_uids: str = "archive"  # one SOP Instance UID, different content: or quarantine
    decompress_lossy: bool = False  # send lossy JPEG decompressed where a PACS accepts no JPEG
    prune_verify: str = "auto"  # archives no PACS can be asked about: auto deletes, required keeps
    audit_interval_days: int = 0  # watch audits every archived folder this often (0: never)
    status_listen: tuple[str, int] | None = None  # watch serves its status page here
    status_token: str = ""  # required on any address but loopback
    status_tls_cert: Path | None = None
    status_tls_key: Path | None = None
    status_actions: bool = False  # release, retry from the page (needs STATUS_TOKEN)
    alert_webhook: str = ""  # JSON POST on quarantine, held folder, destination down/up
    alert_after: int = 900  # seconds a destination may fail before an alert
    probe_interval: int = 30  # watch asks a destination that is down by C-ECHO this often
    unpack_max_files: int = 50_000  # an archive dropped in a folder holds at most this many
    unpack_max_bytes: int = 20 << 30  # ... and expands to at most this many bytes
    unpack_max_ratio: int = 100  # ... and never more than this many bytes out per byte in
    dry_run: bool = False


# key -> (environment variable, default). The TOML file uses the keys.
_SCALARS: dict[str, tuple[str, Any]] = {
    "import_dir": ("IMPORT_DIR", "/dicom/import"),
    "archive_dir": ("ARCHIVE_DIR", "/dicom/archived"),
    "failed_dir": ("FAILED_DIR", "/dicom/failed"),
    "log_dir": ("LOG_DIR", "/data/log"),
    "state_dir": ("STATE_DIR", "/data/state"),
    "calling_aet": ("CALLING_AET", "STORESCU"),
    "folder_pattern": ("FOLDER_PATTERN", DEFAULT_PATTERN),
    "delay": ("DELAY", 180),
    "associations": ("ASSOCIATIONS", 4),
    "connect_timeout": ("CONNECT_TIMEOUT", 10),
    "acse_timeout": ("ACSE_TIMEOUT", 30),
    "dimse_timeout": ("DIMSE_TIMEOUT", 120),
    "mixed_patients": ("MIXED_PATIENTS", "hold"),
    "reconcile": ("RECONCILE", "hold"),
    "reconcile_worklist": ("RECONCILE_WORKLIST", ""),
    "max_attempts": ("MAX_ATTEMPTS", 3),
    "verify_attempts": ("VERIFY_ATTEMPTS", 3),
    "verify_delay": ("VERIFY_DELAY", 2),
    "log_retention_days": ("LOG_RETENTION_DAYS", 30),
    "archive_retention_days": ("ARCHIVE_RETENTION_DAYS", 90),
    "log_patient_names": ("LOG_PATIENT_NAMES", True),
    "settle_seconds": ("SETTLE_SECONDS", 5),
    "incomplete_grace": ("INCOMPLETE_GRACE", 3600),
    "duplicate_uids": ("DUPLICATE_UIDS", "archive"),
    "decompress_lossy": ("DECOMPRESS_LOSSY", False),
    "prune_verify": ("PRUNE_VERIFY", "auto"),
    "audit_interval_days": ("AUDIT_INTERVAL_DAYS", 0),
    "status_listen": ("STATUS_LISTEN", ""),
    "status_token": ("STATUS_TOKEN", ""),
    "status_tls_cert": ("STATUS_TLS_CERT", ""),
    "status_tls_key": ("STATUS_TLS_KEY", ""),
    "status_actions": ("STATUS_ACTIONS", False),
    "alert_webhook": ("ALERT_WEBHOOK", ""),
    "alert_after": ("ALERT_AFTER", 900),
    "probe_interval": ("PROBE_INTERVAL", 30),
    "unpack_max_files": ("UNPACK_MAX_FILES", 50_000),
    "unpack_max_bytes": ("UNPACK_MAX_BYTES", "20G"),
    "unpack_max_ratio": ("UNPACK_MAX_RATIO", 100),
}

# Environment variables of the old scripts, per destination: field -> variable.
_LEGACY_DESTINATIONS: dict[str, dict[str, str]] = {
    "primary": {"host": "PACS_SERVER_IP", "port": "PACS_SERVER_PORT", "aet": "PACS_AET"},
    "backup": {"host": "BACKUP_PACS_IP", "port": "BACKUP_PACS_PORT", "aet": "BACKUP_PACS_AET"},
}
# Optional per-destination settings from the environment: <PREFIX>_TLS_KEY and so on.
_DESTINATION_ENV_PREFIX = {"primary": "PACS", "backup": "BACKUP_PACS"}
_OPTIONAL_ENV_FIELDS = ("tls_key", "tls_cert", "tls_ca", "verify")
_LEGACY_DEFAULTS = {"host": "127.0.0.1", "port": 11112, "aet": "DCM4CHEE"}


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
    *,
    create_dirs: bool = True,
) -> Settings:
    """Merge flags > env > TOML file > defaults and validate everything."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if env is None else env
    config_file = config_file or env.get("IMPORTER_CONFIG")
    toml = _read_toml(config_file) if config_file else {}

    def raw(key: str) -> tuple[Any, str]:
        """The value for key and the name the user gave it under."""
        var, default = _SCALARS[key]
        if key in flags:
            return flags[key], "--" + key.replace("_", "-")
        if env.get(var, "") != "":
            return env[var], var
        if key in toml:
            return toml[key], f"{key} in {config_file}"
        return default, var

    def get(key: str, parse: Callable[[Any, str], Any]) -> Any:
        value, source = raw(key)
        return parse(value, source)

    common = {
        "calling_aet": get("calling_aet", _ae_title),
        "associations": get("associations", _int_range(1, 32)),
        "connect_timeout": get("connect_timeout", _int_range(1, 3600)),
        "acse_timeout": get("acse_timeout", _int_range(1, 3600)),
        "dimse_timeout": get("dimse_timeout", _int_range(1, 86400)),
    }
    settings = Settings(
        import_dir=get("import_dir", _path),
        archive_dir=get("archive_dir", _path),
        failed_dir=get("failed_dir", _path),
        log_dir=get("log_dir", _path),
        state_dir=get("state_dir", _path),
        destinations=_destinations(flags, env, toml, config_file, common),
        folder_pattern=get("folder_pattern", _pattern),
        delay=get("delay", _int_range(0, 7 * 86400)),
        mixed_patients=get("mixed_patients", _choice("hold", "warn", "allow")),
        reconcile=get("reconcile", _choice("hold", "warn", "required", "off")),
        reconcile_worklist=_worklist(*raw("reconcile_worklist"), common),
        max_attempts=get("max_attempts", _int_range(1, 100)),
        verify_attempts=get("verify_attempts", _int_range(1, 20)),
        verify_delay=get("verify_delay", _int_range(0, 600)),
        log_retention_days=get("log_retention_days", _int_range(0, 36500)),
        archive_retention_days=get("archive_retention_days", _int_range(0, 36500)),
        log_patient_names=get("log_patient_names", _bool),
        settle_seconds=get("settle_seconds", _int_range(0, 86400)),
        incomplete_grace=get("incomplete_grace", _int_range(0, 30 * 86400)),
        duplicate_uids=get("duplicate_uids", _choice("archive", "quarantine")),
        decompress_lossy=get("decompress_lossy", _bool),
        prune_verify=get("prune_verify", _choice("auto", "required")),
        audit_interval_days=get("audit_interval_days", _int_range(0, 3650)),
        status_listen=get("status_listen", _listen),
        status_token=str(raw("status_token")[0] or ""),
        status_tls_cert=get("status_tls_cert", _optional_file),
        status_tls_key=get("status_tls_key", _optional_file),
        status_actions=get("status_actions", _bool),
        alert_webhook=get("alert_webhook", _url),
        alert_after=get("alert_after", _int_range(0, 7 * 86400)),
        probe_interval=get("probe_interval", _int_range(1, 3600)),
        unpack_max_files=get("unpack_max_files", _int_range(1, 10_000_000)),
        unpack_max_bytes=get("unpack_max_bytes", _size(1 << 20, 1 << 50)),
        unpack_max_ratio=get("unpack_max_ratio", _int_range(2, 100_000)),
        dry_run=bool(flags.get("dry_run", False)),
    )
    _check_dirs(settings, raw, create=create_dirs and not settings.dry_run)
    _check_status_page(settings, raw)
    return settings


def _destinations(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    toml: Mapping[str, Any],
    config_file: str | None,
    common: Mapping[str, Any],
) -> tuple[Destination, ...]:
    by_name: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, str]] = {}
    for i, entry in enumerate(toml.get("destination", [])):
        if not isinstance(entry, dict):
            raise ConfigError(f"destination #{i + 1} in {config_file}: must be a table")
        name = str(entry.get("name", f"destination{i + 1}"))
        by_name[name] = dict(entry)
        sources[name] = {k: f"destination '{name}' {k} in {config_file}" for k in entry}

    for name, variables in _LEGACY_DESTINATIONS.items():
        given = {f: env[v] for f, v in variables.items() if env.get(v, "") != ""}
        if name == "primary" and flags.get("pacs"):
            given.update(_parse_pacs_flag(flags["pacs"]))
            variables = {f: "--pacs" for f in variables}
        if not given and (name != "primary" or by_name):
            continue
        entry = by_name.setdefault(name, {})
        for f in _OPTIONAL_ENV_FIELDS:
            var = f"{_DESTINATION_ENV_PREFIX[name]}_{f.upper()}"
            if env.get(var, "") != "":
                entry[f] = env[var]
                sources.setdefault(name, {})[f] = var
        for f, var in variables.items():
            if f in given:
                entry[f] = given[f]
                sources.setdefault(name, {})[f] = var
            elif f not in entry:
                entry[f] = _LEGACY_DEFAULTS[f]
                sources.setdefault(name, {})[f] = var

    result = []
    for name, entry in by_name.items():
        src = sources.get(name, {})

        def pick(key: str, parse: Callable[[Any, str], Any], default: Any, *,
                 _e: dict[str, Any] = entry, _s: dict[str, str] = src, _n: str = name) -> Any:
            return parse(_e.get(key, default), _s.get(key, f"destination '{_n}' {key}"))

        result.append(
            Destination(
                name=name,
                host=pick("host", _host, None),
                port=pick("port", _int_range(1, 65535, "a port number"), None),
                called_aet=pick("aet", _ae_title, None),
                calling_aet=pick("calling_aet", _ae_title, common["calling_aet"]),
                required=pick("required", _bool, True),
                associations=pick("associations", _int_range(1, 32), common["associations"]),
                connect_timeout=pick("connect_timeout", _int_range(1, 3600),
                                     common["connect_timeout"]),
                acse_timeout=pick("acse_timeout", _int_range(1, 3600), common["acse_timeout"]),
                dimse_timeout=pick("dimse_timeout", _int_range(1, 86400), common["dimse_timeout"]),
                tls_key=pick("tls_key", _readable_file, None),
                tls_cert=pick("tls_cert", _readable_file, None),
                tls_ca=pick("tls_ca", _readable_file, None),
                verify=pick("verify", _choice("auto", "c-find", "none"), "auto"),
            )
        )
        last = result[-1]
        if bool(last.tls_key) != bool(last.tls_cert):
            raise ConfigError(f"destination '{name}': tls_key and tls_cert go together"
                              " (a client certificate needs its key)")
        if last.tls_cert and not last.tls_ca:
            raise ConfigError(f"destination '{name}': TLS needs tls_ca, the CA certificate"
                              " the PACS's certificate is checked against")
    if not any(d.required for d in result):
        raise ConfigError("destinations: at least one destination must be required")
    return tuple(result)


def _worklist(value: Any, source: str, common: Mapping[str, Any]) -> Destination | None:
    """RECONCILE_WORKLIST=AET@HOST:PORT: a Modality Worklist SCP asked for demographics."""
    text = str(value or "").strip()
    if not text:
        return None
    match = re.fullmatch(r"(?P<aet>[^@]+)@(?P<host>[^:]+):(?P<port>\d+)", text)
    if not match:
        raise ConfigError(f"{source}: {text!r} is not AET@HOST:PORT")
    return Destination(
        name="worklist", host=_host(match["host"], source),
        port=_int_range(1, 65535, "a port number")(match["port"], source),
        called_aet=_ae_title(match["aet"], source), calling_aet=common["calling_aet"],
        required=False, connect_timeout=common["connect_timeout"],
        acse_timeout=common["acse_timeout"], dimse_timeout=common["dimse_timeout"],
        verify="none")


def _parse_pacs_flag(value: str) -> dict[str, str]:
    match = re.fullmatch(r"(?P<aet>[^@]+)@(?P<host>[^:]+):(?P<port>\d+)", value)
    if not match:
        raise ConfigError(f"--pacs: {value!r} is not AET@HOST:PORT")
    return match.groupdict()


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


# --- parsers: (value, source) -> checked value, or ConfigError naming the source ---


def _path(value: Any, source: str) -> Path:
    if not isinstance(value, str | Path) or not str(value).strip():
        raise ConfigError(f"{source}: must be a directory path")
    return Path(value).expanduser()


def _readable_file(value: Any, source: str) -> Path | None:
    if value is None or str(value).strip() == "":
        return None
    path = Path(str(value)).expanduser()
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(f"{source}: {path} is not a readable file")
    return path


def _host(value: Any, source: str) -> str:
    text = str(value or "").strip()
    if not text or not re.fullmatch(r"[A-Za-z0-9.\-:\[\]]+", text):
        raise ConfigError(f"{source}: {value!r} is not a host name or IP address")
    return text


def _ae_title(value: Any, source: str) -> str:
    text = str(value if value is not None else "")
    if not text.strip():
        raise ConfigError(f"{source}: an AE title cannot be empty")
    if len(text) > 16:
        raise ConfigError(f"{source}: AE title {text!r} is longer than 16 characters")
    if not text.isascii() or any(ch in "\\" or not ch.isprintable() for ch in text):
        raise ConfigError(f"{source}: AE title {text!r} has characters DICOM does not allow")
    return text.strip()


def _int_range(low: int, high: int, what: str = "a whole number") -> Callable[[Any, str], int]:
    def parse(value: Any, source: str) -> int:
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{source}: {value!r} is not {what} ({low}-{high})") from None
        if not low <= number <= high:
            raise ConfigError(f"{source}: {number} is not {what} ({low}-{high})")
        return number

    return parse


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(low: int, high: int) -> Callable[[Any, str], int]:
    """Bytes, as a whole number or with a binary unit: 500M, 20G, 1T."""
    def parse(value: Any, source: str) -> int:
        match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", str(value), re.IGNORECASE)
        if not match:
            raise ConfigError(f"{source}: {value!r} is not a size in bytes (e.g. 20G, 500M)")
        number = int(match[1]) * _SIZE_UNITS[match[2].upper()]
        if not low <= number <= high:
            raise ConfigError(f"{source}: {value!r} is not between 1M and 1024T")
        return number

    return parse


def _choice(*choices: str) -> Callable[[Any, str], str]:
    def parse(value: Any, source: str) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ConfigError(f"{source}: {value!r} must be one of {', '.join(choices)}")
        return text

    return parse


def _bool(value: Any, source: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{source}: {value!r} must be true or false")


def _pattern(value: Any, source: str) -> re.Pattern[str]:
    try:
        return compile_pattern(str(value))
    except PatternError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _listen(value: Any, source: str) -> tuple[str, int] | None:
    text = str(value or "").strip()
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{source}: {text!r} is not HOST:PORT (e.g. 127.0.0.1:8088)")
    return host.strip("[]") or "0.0.0.0", int(port)


def _optional_file(value: Any, source: str) -> Path | None:
    if not value:
        return None
    path = Path(str(value))
    if not path.is_file():
        raise ConfigError(f"{source}: {path} is not a file")
    return path


def _url(value: Any, source: str) -> str:
    text = str(value or "").strip()
    if text and not re.match(r"^https?://[^\s/]+", text):
        raise ConfigError(f"{source}: {text!r} is not an http(s) URL")
    return text


_LOOPBACK = ("127.", "::1", "localhost")


def _check_status_page(settings: Settings, raw: Callable[[str], tuple[Any, str]]) -> None:
    """A status page on any address but loopback needs a token: it shows patient folders."""
    if settings.status_listen is None:
        return
    host = settings.status_listen[0]
    if not host.startswith(_LOOPBACK) and not settings.status_token:
        raise ConfigError(f"{raw('status_listen')[1]}: listening on {host} needs a token:"
                          f" set {raw('status_token')[1]}")
    if settings.status_actions and not settings.status_token:
        raise ConfigError(f"{raw('status_actions')[1]}: actions from the status page need a"
                          f" token, on any address: set {raw('status_token')[1]}")
    if bool(settings.status_tls_cert) != bool(settings.status_tls_key):
        raise ConfigError(f"{raw('status_tls_cert')[1]} and {raw('status_tls_key')[1]}:"
                          " give both, or neither")


def _check_dirs(settings: Settings, raw: Callable[[str], tuple[Any, str]], *, create: bool) -> None:
    import_dir = settings.import_dir
    source = raw("import_dir")[1]
    if not import_dir.is_dir():
        raise ConfigError(f"{source}: {import_dir} does not exist or is not a directory")
    if not os.access(import_dir, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError(f"{source}: {import_dir} is not readable and writable by this user")
    for key in ("archive_dir", "failed_dir", "log_dir", "state_dir"):
        path: Path = getattr(settings, key)
        source = raw(key)[1]
        if create:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"{source}: cannot create {path}: {exc.strerror}") from None
        if path.exists() and not (path.is_dir() and os.access(path, os.W_OK | os.X_OK)):
            raise ConfigError(f"{source}: {path} is not a writable directory")
