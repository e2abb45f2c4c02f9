"""Smoke test of the Docker image (docker/Dockerfile, docker/docker-compose.yml).

Builds the image from the working tree and runs it for real: as a non-root user, with
``--network host``, against a DCMTK ``storescp`` on loopback, with bind-mounted ``/dicom`` and
``/data``. A patient folder dropped into the import dir must reach the receiver under the
folder's identity and be archived under ``/dicom/archived/<yyyymmdd_hhmmss>/<folder>/``.

The engine: as root with ``dockerd`` installed (Debian ``docker.io``), the tests start a
private one (``--bridge=none --iptables=false --ip6tables=false``, own data-root, exec-root and
socket under the cache dir) and stop it by its pid at the end. Otherwise they use the engine
that ``DOCKER_HOST`` or the default socket points to; with neither, they are skipped, saying
why. Docker Hub is not needed: the base image is a ``debootstrap --variant=minbase bookworm``
tree imported with ``docker import``. The private engine's data-root is kept under the cache
dir, so the base image and the build's layers survive between runs (from nothing: ~30 s
debootstrap + ~40 s build; cached: a few seconds).

Environment:
  SKIP_DOCKER_TESTS=1       skip these tests
  DOCKER_TEST_CACHE         cache dir (default /var/tmp/dicom-importer-docker)
  DOCKER_TEST_BASE_IMAGE    a bookworm image to build on instead of the debootstrap one
  DEBOOTSTRAP_MIRROR        Debian mirror for debootstrap (default http://deb.debian.org/debian)
  DOCKER_TEST_CA_BUNDLE     CA bundle trusted by the build stage, for pip behind a TLS-
                            intercepting proxy (default /etc/ssl/certs/ca-certificates.crt)
  PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST
                            passed to the build stage when set (http/https URLs only)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from simsite.receivers import StoreSCP

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("DOCKER_TEST_CACHE", "/var/tmp/dicom-importer-docker"))
IMAGE = "dicom-importer:smoke"
BASE_IMAGE = "dicom-importer-test/bookworm-minbase"
CA_BUNDLE = Path(os.environ.get("DOCKER_TEST_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"))
MIRROR = os.environ.get("DEBOOTSTRAP_MIRROR", "http://deb.debian.org/debian")
COMPOSE_FILE = REPO / "docker" / "docker-compose.yml"
ARCHIVE_BATCH = re.compile(r"^\d{8}_\d{6}$")
# The user the container runs as (none of these ids exists on the host or in the image).
PUID, PGID = 4242, 4243

pytestmark = pytest.mark.skipif(
    os.environ.get("SKIP_DOCKER_TESTS", "") not in ("", "0"), reason="SKIP_DOCKER_TESTS is set"
)


def _tail(text: str | bytes, n: int = 40) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.splitlines()[-n:])


@dataclass
class Engine:
    """A Docker engine reachable with ``env`` (DOCKER_HOST); ``proc`` when we started it."""

    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    facts: dict[str, str] = field(default_factory=dict)

    def docker(self, *args: str, check: bool = True,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["docker", *args], env=self.env, capture_output=True,
                                timeout=timeout, text=True, errors="replace",
                                stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            pytest.fail(f"docker {' '.join(args)} exited {result.returncode}:\n"
                        f"{_tail(result.stdout)}\n{_tail(result.stderr)}")
        return result

    def answers(self) -> bool:
        try:
            return self.docker("version", check=False, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def inspect(self, kind: str, name: str) -> dict:
        return json.loads(self.docker(kind, "inspect", name).stdout)[0]


# --- the engine ---------------------------------------------------------------------------


def _wait_for_lock(path: Path, timeout: float = 900) -> object:
    """Serialise test runs that share the cache dir (one private engine per data-root)."""
    fh = open(path, "w")  # noqa: SIM115 - held until the session ends
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except BlockingIOError:
            if time.monotonic() > deadline:
                fh.close()
                pytest.skip(f"another run holds {path} for over {timeout:.0f} s")
            time.sleep(1)


def _stop_leftover_daemon(pidfile: Path, data_root: Path) -> None:
    """A daemon an earlier, killed run of these tests left on our data-root: stop it by pid."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if not cmdline or not cmdline[0].endswith(b"dockerd") or str(data_root).encode() not in (
            b" ".join(cmdline)):
        return
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not Path(f"/proc/{pid}").exists():
            return


def _stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the dockerd we started (it stops its own containerd), SIGKILL if it hangs."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    _unmount_under(CACHE)


def _unmount_under(top: Path) -> None:
    """dockerd leaves its data-root (bound onto itself) and exec-root/netns/default mounted
    when it exits: unmount them, so the cache dir can be deleted like any other."""
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    prefix = str(top).rstrip("/") + "/"
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", point], capture_output=True, stdin=subprocess.DEVNULL,
                       timeout=30, check=False)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    if shutil.which("docker") is None:
        pytest.skip("no docker client (apt-get install docker.io)")
    dockerd = shutil.which("dockerd")
    if dockerd is None or os.geteuid() != 0:
        # No private engine possible: an engine that already runs will do.
        existing = Engine(env=dict(os.environ))
        if existing.answers():
            yield existing
            return
        why = "dockerd is not installed (Debian package docker.io)" if dockerd is None \
            else "not root, so no private dockerd can be started"
        pytest.skip(f"no Docker engine: {why}, and none answers at "
                    f"{os.environ.get('DOCKER_HOST', 'the default socket')}")

    CACHE.mkdir(parents=True, exist_ok=True)
    lock = _wait_for_lock(CACHE / "lock")
    data_root, exec_root = CACHE / "root", CACHE / "exec"
    sock, pidfile, log_path = CACHE / "docker.sock", CACHE / "dockerd.pid", CACHE / "dockerd.log"
    _stop_leftover_daemon(pidfile, data_root)
    argv = [dockerd, "--bridge=none", "--iptables=false", "--ip6tables=false",
            f"--data-root={data_root}", f"--exec-root={exec_root}", "-H", f"unix://{sock}",
            f"--pidfile={pidfile}"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}
    env.pop("DOCKER_CONTEXT", None)
    eng = Engine(env=env, proc=proc, log_path=log_path)
    try:
        deadline = time.monotonic() + 60

        def ours() -> bool:  # the socket answers, and it is the daemon we started
            with contextlib.suppress(OSError, ValueError):
                return int(pidfile.read_text().strip()) == proc.pid and eng.answers()
            return False

        while not ours():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"a Docker engine cannot be started here ({' '.join(argv)} "
                            f"exit {proc.poll()}):\n{_tail(log_path.read_bytes(), 15)}")
            time.sleep(0.3)
        yield eng
    finally:
        _stop_daemon(proc)
        lock.close()  # type: ignore[attr-defined]


# --- the image ----------------------------------------------------------------------------


def _base_image(engine: Engine) -> str:
    """A bookworm base image: given, cached, or made now with debootstrap + docker import."""
    if given := os.environ.get("DOCKER_TEST_BASE_IMAGE"):
        return given
    if engine.docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None or os.geteuid() != 0:
        pytest.skip("no base image: needs root and debootstrap (apt-get install debootstrap), "
                    "or DOCKER_TEST_BASE_IMAGE")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="debootstrap-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        started = time.monotonic()
        result = subprocess.run([debootstrap, "--variant=minbase", "bookworm", str(rootfs), MIRROR],
                                capture_output=True, timeout=900, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            pytest.fail(f"debootstrap failed ({result.returncode}):\n{_tail(result.stdout)}\n"
                        f"{_tail(result.stderr)}")
        # What debian:bookworm-slim does not carry either: downloaded .debs and index files.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        for path in (rootfs / "var/cache/apt").glob("*.bin"):
            path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout,
                                  env=engine.env, capture_output=True, text=True, timeout=600)
        tar.stdout.close()  # type: ignore[union-attr]
        if tar.wait() != 0 or imported.returncode != 0:
            pytest.fail(f"docker import failed: {imported.stderr}")
        engine.facts["base image"] = f"made in {time.monotonic() - started:.0f} s"
    return BASE_IMAGE


def _build_context(dest: Path) -> Path:
    """The repo's build context (what .dockerignore lets in) plus this machine's CA bundle."""
    for name in ("pyproject.toml", "README.md", "LICENSE", ".dockerignore"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "data", "dicom", "orthanc-db")
    shutil.copytree(REPO / "importer", dest / "importer", ignore=ignore)
    shutil.copytree(REPO / "docker", dest / "docker", ignore=ignore)
    if CA_BUNDLE.is_file():
        shutil.copy(CA_BUNDLE, dest / "docker" / "certs" / "build-host-ca-bundle.crt")
    return dest


@pytest.fixture(scope="module")
def image(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> str:
    base = _base_image(engine)
    context = _build_context(tmp_path_factory.mktemp("docker-context"))
    args = ["build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
            "-f", "docker/Dockerfile"]
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"):
        value = " ".join(v for v in os.environ.get(var, "").split()
                         if var == "PIP_TRUSTED_HOST" or v.startswith(("http://", "https://")))
        if value:
            args += ["--build-arg", f"{var}={value}"]
    started = time.monotonic()
    # The classic builder: it is what Debian's engine has without the buildx plugin, and the
    # Dockerfile must build with it (BuildKit builds it too).
    env = {**engine.env, "DOCKER_BUILDKIT": "0"}
    # The build stage is tagged too, so that pruning the dangling images of earlier builds
    # (which keeps the cache dir from growing with every code change) keeps its layers cached.
    for extra in (["--target", "build", "-t", f"{IMAGE}-build-stage"], ["-t", IMAGE]):
        result = subprocess.run(["docker", *args, *extra, str(context)], env=env,
                                capture_output=True, text=True, errors="replace", timeout=1800,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            pytest.fail(f"docker build failed ({result.returncode}):\n"
                        f"{_tail(result.stdout, 60)}\n{_tail(result.stderr)}")
    engine.docker("image", "prune", "--force", check=False)
    size = engine.inspect("image", IMAGE)["Size"]
    base_size = engine.inspect("image", base)["Size"]
    engine.facts |= {"build": f"{time.monotonic() - started:.0f} s",
                     "image": f"{size / 1e6:.0f} MB ({(size - base_size) / 1e6:.0f} MB over "
                              f"the base {base}, {base_size / 1e6:.0f} MB)"}
    print(f"\n[docker] {engine.facts}")
    return IMAGE


# --- helpers for a running site -----------------------------------------------------------


@dataclass
class DockerSite:
    """Host directories bind-mounted as /dicom and /data, owned by the container's user."""

    root: Path
    uid: int = PUID
    gid: int = PGID
    prepare: bool = True  # False: leave the dirs to Docker and the entrypoint

    def __post_init__(self) -> None:
        if not self.prepare:
            return
        for d in (self.dicom / "import", self.dicom / "archived", self.dicom / "failed",
                  self.data):
            d.mkdir(parents=True, exist_ok=True)
        self.chown(self.dicom)
        self.chown(self.data)

    dicom = property(lambda self: self.root / "dicom")
    data = property(lambda self: self.root / "data")
    staging = property(lambda self: self.root / "staging")

    def chown(self, top: Path) -> None:
        for path in [top, *top.rglob("*")]:
            os.lchown(path, self.uid, self.gid)

    def drop(self, folder_name: str, n_files: int, **kwargs: object) -> list[Path]:
        """Make a patient folder aside, then move it into import/ whole, as a user would."""
        from simsite.dicomgen import make_patient_folder

        files = make_patient_folder(self.staging, folder_name, n_files, rows=16, **kwargs)
        self.chown(self.staging / folder_name)
        (self.staging / folder_name).rename(self.dicom / "import" / folder_name)
        return files

    def archived(self, folder_name: str) -> list[Path]:
        return sorted(p for p in (self.dicom / "archived").glob(f"*/{folder_name}/**/*")
                      if p.is_file())

    def remaining(self) -> list[Path]:
        return sorted(p for p in (self.dicom / "import").rglob("*") if p.is_file())


def _wait(predicate, timeout: float, what: str, diagnose) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnose()}")
        time.sleep(0.5)


def _check_delivered(site: DockerSite, receiver: StoreSCP, folders: dict[str, tuple[str, str]],
                     n_files: int) -> None:
    """Every file of every folder reached the receiver with its identity and was archived."""
    datasets = receiver.received_datasets()
    assert len(datasets) == n_files * len(folders), [str(p) for p in receiver.received()]
    by_id: dict[str, list] = {}
    for ds in datasets:
        by_id.setdefault(str(ds.PatientID), []).append(ds)
    for folder, (patient_id, patient_name) in folders.items():
        assert len(by_id.get(patient_id, [])) == n_files, folder
        assert {str(ds.PatientName) for ds in by_id[patient_id]} == {patient_name}
        archived = site.archived(folder)
        assert len(archived) == n_files, folder
        for path in archived:
            batch = path.relative_to(site.dicom / "archived").parts[0]
            assert ARCHIVE_BATCH.match(batch), batch
            assert path.stat().st_uid == site.uid, f"{path} not owned by {site.uid}"
    assert site.remaining() == []


# --- the tests ----------------------------------------------------------------------------


def test_compose_file_is_valid() -> None:
    """docker-compose v1 (Debian's) accepts the file; the demo PACS is behind a profile."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose (v1) is not installed (apt-get install docker-compose)")
    base = ["docker-compose", "-f", str(COMPOSE_FILE)]
    plain = subprocess.run([*base, "config"], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL, env={**os.environ, "PUID": "", "PGID": ""})
    assert plain.returncode == 0, plain.stderr
    for expected in ("restart: unless-stopped", "TZ: Asia/Seoul", "max-size: 10m",
                     "PACS_SERVER_IP: 127.0.0.1", "PACS_SERVER_PORT: '11112'",
                     "PACS_AET: DCM4CHEE", "DELAY: '180'", ":/data:rw", ":/dicom:rw",
                     "- demo"):
        assert expected in plain.stdout, expected


def test_image_contents(engine: Engine, image: str) -> None:
    """Runtime only: DCMTK and the importer, no compiler, no build-time CA or pip settings."""
    script = (
        "set -e; for t in storescu echoscu dcmodify dcmdump dcmftest dcmconv; do "
        "command -v $t >/dev/null || { echo missing $t; exit 1; }; done; "
        "for t in gcc cc c++ make pip pip3; do "
        "! command -v $t >/dev/null || { echo found $t; exit 1; }; done; "
        "test ! -e /usr/local/share/ca-certificates/extra || { echo build CA left; exit 1; }; "
        "! env | grep -i '^pip_' || { echo pip env left; exit 1; }; "
        "test ! -e /etc/pip.conf; importer --help >/dev/null; id importer; date +%Z"
    )
    result = engine.docker("run", "--rm", "-e", "TZ=Asia/Seoul", "--entrypoint", "sh", image,
                           "-c", script, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "KST"
    config = engine.inspect("image", image)["Config"]
    assert config["Entrypoint"] == ["/usr/local/bin/docker-entrypoint", "importer"]
    assert config["Cmd"] == ["watch"]
    assert set(config["Volumes"]) == {"/data", "/dicom"}
    assert not [e for e in config["Env"] if e.upper().startswith("PIP_")]
    history = engine.docker("history", "--no-trunc", image).stdout
    assert "ca-certificates/extra" not in history and "PIP_CERT" not in history


def test_run_once_as_user_flag(engine: Engine, image: str, tmp_path: Path) -> None:
    """`docker run --user UID:GID …`: no privilege handling, just runs: check, run-once
    (exit 0, delivered, archived), status --json."""
    site = DockerSite(tmp_path, uid=PUID + 10, gid=PGID + 10)
    site.drop("#1001-Doe^Jane", 3)
    with StoreSCP(tmp_path / "received") as receiver:

        def importer(*args: str) -> subprocess.CompletedProcess[str]:
            return engine.docker(
                "run", "--rm", "--network", "host", "--user", f"{site.uid}:{site.gid}",
                "-e", "PACS_SERVER_IP=127.0.0.1", "-e", f"PACS_SERVER_PORT={receiver.port}",
                "-e", f"PACS_AET={receiver.aet}", "-e", "DELAY=0",
                "-e", "SETTLE_SECONDS=0",  # the files were written a moment ago
                "-v", f"{site.dicom}:/dicom", "-v", f"{site.data}:/data", image, *args,
                check=False, timeout=180)

        # The operator's commands work in the image: DCMTK found, dirs writable, C-ECHO.
        checked = importer("check")
        assert checked.returncode == 0 and "C-ECHO" in checked.stdout and not [
            line for line in checked.stdout.splitlines() if line.startswith("FAIL")], \
            checked.stdout + checked.stderr
        result = importer("run-once")
        assert result.returncode == 0, result.stdout + result.stderr
        status = importer("status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        json.loads(status.stdout)
        receiver.stop()
        _check_delivered(site, receiver, {"#1001-Doe^Jane": ("1001", "Doe^Jane")}, 3)
    assert (site.data / "log" / "log.log").stat().st_uid == site.uid


def test_watch_service_as_puid(engine: Engine, image: str, tmp_path: Path) -> None:
    """The default command (`watch`) started as root with PUID/PGID: it drops to that user,
    imports a folder dropped while it runs, reports healthy, and stops on SIGTERM."""
    site = DockerSite(tmp_path)
    # What the old scripts (which ran as root) leave behind: root's log.log and archive.
    old_log = site.data / "log" / "log.log"
    old_log.parent.mkdir()
    old_log.write_text("old scripts' log line\n")
    # (Recent: pruning, which cannot delete root's files, is not what is tested here.)
    recent = time.strftime("%Y%m%d_%H%M%S", time.localtime(time.time() - 86400))
    old_batch = site.dicom / "archived" / recent / "#1-Old^Patient"
    old_batch.mkdir(parents=True)
    (old_batch / "IM1.dcm").write_bytes(b"old")
    for path in (old_log.parent, old_log, *(site.dicom / "archived").rglob("*"),
                 site.dicom / "archived"):
        os.lchown(path, 0, 0)
    name = f"dki-smoke-watch-{os.getpid()}"
    folders = {"#777-홍길동": ("777", "홍길동"), "#12345-Doe^John": ("12345", "Doe^John")}
    with StoreSCP(tmp_path / "received") as receiver:
        engine.docker(
            "run", "-d", "--name", name, "--network", "host",
            "-e", f"PUID={site.uid}", "-e", f"PGID={site.gid}", "-e", "TZ=Asia/Seoul",
            "-e", "PACS_SERVER_IP=127.0.0.1", "-e", f"PACS_SERVER_PORT={receiver.port}",
            "-e", f"PACS_AET={receiver.aet}", "-e", "DELAY=2", "--cap-add", "LEASE",
            "--health-interval=1s", "--health-start-period=0s",
            "-v", f"{site.dicom}:/dicom", "-v", f"{site.data}:/data", image)
        try:

            def diagnose() -> str:
                logs = engine.docker("logs", name, check=False)
                return (f"container logs:\n{_tail(logs.stdout)}\n{_tail(logs.stderr)}\n"
                        f"storescp:\n{_tail(receiver.log())}\n"
                        f"import dir: {site.remaining()}")

            # Once the entrypoint is done, every process runs as PUID (tini, PID 1, included).
            _wait(lambda: any("/opt/importer/bin/importer watch" in args
                              for _, args in _top(engine, name)), 30,
                  "the importer to start", diagnose)
            assert {uid for uid, _ in _top(engine, name)} == {str(site.uid)}, \
                f"{_top(engine, name)}\n{diagnose()}"
            # ... keeping CAP_LEASE (cap_add), and no other capability, for the read leases
            # that tell whether another process still writes a file it does not own.
            status = engine.docker("exec", name, "cat", "/proc/1/status").stdout
            caps = {k: int(v, 16) for k, v in (line.split(":\t") for line in status.splitlines()
                                               if line.startswith("Cap"))}
            assert caps["CapEff"] == 1 << 28 == caps["CapAmb"], status

            for folder in folders:
                site.drop(folder, 4, subdirs=2 if folder.startswith("#1") else 0)
            n_expected = 4 * len(folders)
            _wait(lambda: sum(len(site.archived(f)) for f in folders) == n_expected
                  and len(receiver.received()) == n_expected, 120,
                  "the folders to be delivered and archived", diagnose)
            _check_delivered(site, receiver, folders, 4)
            # The entrypoint gave the importer its log dir (the old plain-text log is kept
            # aside, the new log.log is JSON and the importer's) and the archive dir itself,
            # but not the archive's old contents.
            (kept,) = old_log.parent.glob("log.log.scripts-*")
            assert kept.read_text() == "old scripts' log line\n"
            assert old_log.stat().st_uid == site.uid
            assert old_log.read_text().startswith("{")
            assert len(old_log.read_text().splitlines()) > 1
            assert (site.dicom / "archived").stat().st_uid == site.uid
            assert (old_batch / "IM1.dcm").stat().st_uid == 0

            _check_healthcheck(engine, name, diagnose)

            started = time.monotonic()
            engine.docker("stop", "-t", "20", name, timeout=60)
            stopped_in = time.monotonic() - started
            state = engine.inspect("container", name)["State"]
            assert stopped_in < 15, f"SIGTERM took {stopped_in:.1f} s\n{diagnose()}"
            assert state["ExitCode"] == 0, f"exit {state['ExitCode']}\n{diagnose()}"
        finally:
            engine.docker("rm", "-f", name, check=False)
    assert len(receiver.received()) == 4 * len(folders)  # nothing sent twice


def _top(engine: Engine, name: str) -> list[tuple[str, str]]:
    """(uid, command line) of every process in the container."""
    result = engine.docker("top", name, "-o", "uid,pid,args", check=False)
    return [(fields[0], fields[2]) for line in result.stdout.splitlines()[1:]
            if len(fields := line.split(None, 2)) == 3]


def _check_healthcheck(engine: Engine, name: str, diagnose) -> None:  # noqa: ANN001
    """Docker reports healthy; the image's rule is 'heartbeat modified within 5 minutes'."""
    _wait(lambda: engine.inspect("container", name)["State"].get("Health", {}).get("Status")
          == "healthy", 90, "the container to report healthy", diagnose)
    test = engine.inspect("container", name)["Config"]["Healthcheck"]["Test"]
    assert test[0] == "CMD-SHELL"
    for age, healthy in (("4 minutes ago", True), ("6 minutes ago", False), (None, False)):
        # A heartbeat of our own in another STATE_DIR: the running loop cannot touch it.
        prepare = "rm -rf /tmp/hc && mkdir /tmp/hc"
        if age:
            prepare += f" && touch -d '{age}' /tmp/hc/heartbeat"
        engine.docker("exec", name, "sh", "-c", prepare)
        rc = engine.docker("exec", "-e", "STATE_DIR=/tmp/hc", name, "sh", "-c", test[1],
                           check=False).returncode
        assert (rc == 0) == healthy, f"heartbeat {age}: healthcheck exit {rc}"


def test_compose_up(engine: Engine, image: str, tmp_path: Path) -> None:
    """`docker-compose up -d` with the shipped file (a copy: its ./data and ./dicom land in
    tmp), host dirs not made beforehand (Docker creates them root-owned, as on a NAS): only
    the importer starts (Orthanc is in profile `demo`), it imports, with the file's settings."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose (v1) is not installed (apt-get install docker-compose)")
    project = f"dkismoke{os.getpid()}"
    compose_dir = tmp_path / "compose"
    compose_dir.mkdir()
    shutil.copy(COMPOSE_FILE, compose_dir / "docker-compose.yml")
    engine.docker("tag", image, "dicom-importer:latest")
    with StoreSCP(tmp_path / "received") as receiver:
        env = {**engine.env, "PUID": str(PUID), "PGID": str(PGID), "DELAY": "2",
               "PACS_SERVER_PORT": str(receiver.port), "PACS_AET": receiver.aet}
        compose = ["docker-compose", "-p", project, "-f", str(compose_dir / "docker-compose.yml")]

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*compose, *args], env=env, capture_output=True, text=True,
                                  errors="replace", timeout=180, stdin=subprocess.DEVNULL,
                                  cwd=compose_dir)

        try:
            up = run("up", "-d", "--no-build")
            assert up.returncode == 0, up.stdout + up.stderr
            containers = engine.docker("ps", "-a", "--filter",
                                       f"label=com.docker.compose.project={project}",
                                       "--format", "{{.Names}}").stdout.split()
            assert containers == ["dicom-importer"], containers

            def diagnose() -> str:
                logs = run("logs", "--no-color")
                return f"{_tail(logs.stdout)}\nstorescp:\n{_tail(receiver.log())}"

            site = DockerSite(compose_dir, prepare=False)
            _wait(lambda: (site.dicom / "import").is_dir()
                  and (site.dicom / "import").stat().st_uid == PUID, 30,
                  "the entrypoint to prepare /dicom/import", diagnose)
            site.drop("#555-Kim^Younghee", 3)
            _wait(lambda: len(site.archived("#555-Kim^Younghee")) == 3, 120,
                  "the folder to be delivered and archived", diagnose)
            _check_delivered(site, receiver, {"#555-Kim^Younghee": ("555", "Kim^Younghee")}, 3)

            info = engine.inspect("container", "dicom-importer")
            host = info["HostConfig"]
            assert host["RestartPolicy"]["Name"] == "unless-stopped"
            assert host["NetworkMode"] == "host"
            assert host["LogConfig"] == {"Type": "json-file",
                                         "Config": {"max-file": "5", "max-size": "10m"}}
            assert engine.docker("exec", "dicom-importer", "date", "+%Z").stdout.strip() == "KST"
            status = engine.docker("exec", "-u", "importer", "dicom-importer", "id", "-u")
            assert status.stdout.strip() == str(PUID)
        finally:
            down = run("down", "--timeout", "20")
            with contextlib.suppress(Exception):
                engine.docker("rmi", "dicom-importer:latest", check=False)
        assert down.returncode == 0, down.stdout + down.stderr
