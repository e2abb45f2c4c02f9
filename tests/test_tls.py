"""TLS to a PACS: DCMTK storescp with TLS on loopback, a throwaway CA made by the test."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from simsite.dicomgen import make_ct
from simsite.receivers import StoreSCP
from simsite.site import Site


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for the PACS and a client certificate for the importer,
    plus a second CA nobody trusts."""
    d = tmp_path_factory.mktemp("pki")
    files: dict[str, Path] = {}
    for ca in ("ca", "rogue_ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", f"/CN=Test {ca}", "-keyout", str(d / f"{ca}.key"),
                 "-out", str(d / f"{ca}.crt"))
        files[ca] = d / f"{ca}.crt"
    for who in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=127.0.0.1 {who}",
                 "-keyout", str(d / f"{who}.key"), "-out", str(d / f"{who}.csr"))
        _openssl("x509", "-req", "-in", str(d / f"{who}.csr"), "-CA", str(d / "ca.crt"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-out", str(d / f"{who}.crt"))
        files[f"{who}_key"], files[f"{who}_cert"] = d / f"{who}.key", d / f"{who}.crt"
    return files


@pytest.fixture
def tls_storescp(tmp_path: Path, pki: dict[str, Path]) -> Iterator[StoreSCP]:
    receiver = StoreSCP(tmp_path / "received", extra_args=[
        "+tls", str(pki["server_key"]), str(pki["server_cert"]), "-pw",
        "+cf", str(pki["ca"])])  # and require a client certificate signed by our CA
    with receiver:
        yield receiver


def test_files_reach_a_tls_pacs_with_client_certificate(site: Site, tls_storescp: StoreSCP,
                                                         pki: dict[str, Path]) -> None:
    site.use(tls_storescp)
    site.env |= {"PACS_TLS_KEY": str(pki["client_key"]), "PACS_TLS_CERT": str(pki["client_cert"]),
                 "PACS_TLS_CA": str(pki["ca"])}
    uid = make_ct(site.import_dir / "#40-Tls^Patient" / "a.dcm", rows=16)

    check = site.run("check")
    result = site.run()

    assert check.returncode == 0, check.stdout
    assert result.returncode == 0, result.stderr
    (received,) = tls_storescp.received_datasets()
    assert received.SOPInstanceUID == uid and received.PatientID == "40"
    assert len(site.archived()) == 1


def test_plain_tcp_or_an_untrusted_pacs_certificate_delivers_nothing(
        site: Site, tls_storescp: StoreSCP, pki: dict[str, Path]) -> None:
    site.use(tls_storescp)
    make_ct(site.import_dir / "#41-Tls^Refused" / "a.dcm", rows=16)
    plain = site.run()  # no TLS settings: the TLS PACS cannot talk to us
    site.env |= {"PACS_TLS_KEY": str(pki["client_key"]), "PACS_TLS_CERT": str(pki["client_cert"]),
                 "PACS_TLS_CA": str(pki["rogue_ca"])}
    untrusted = site.run()  # the PACS's certificate does not chain to the CA we trust
    assert plain.returncode == 1 and untrusted.returncode == 1
    assert tls_storescp.received() == [] and site.archived() == {}
    assert site.remaining() == ["#41-Tls^Refused/a.dcm"]


def test_tls_settings_are_checked_at_start(site: Site, pki: dict[str, Path]) -> None:
    site.env["PACS_TLS_CERT"] = str(pki["client_cert"])
    result = site.run()
    assert result.returncode == 2 and "tls_key and tls_cert go together" in result.stderr
    site.env |= {"PACS_TLS_KEY": "/nonexistent.key"}
    result = site.run()
    assert result.returncode == 2 and "PACS_TLS_KEY: /nonexistent.key is not a readable file" \
        in result.stderr
