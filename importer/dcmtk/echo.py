"""echoscu, and the association arguments every network tool shares (AE titles, timeouts,
TLS)."""

from __future__ import annotations

from importer.config import Destination
from importer.dcmtk.runner import ToolRun, run


def association_args(destination: Destination) -> list[str]:
    args = [
        "-aet", destination.calling_aet, "-aec", destination.called_aet,
        "-to", str(destination.connect_timeout), "-ta", str(destination.acse_timeout),
        "-td", str(destination.dimse_timeout),
    ]
    if destination.tls_key and destination.tls_cert:
        # -pw: an unencrypted key; DCMTK would otherwise prompt on stdin.
        args += ["+tls", str(destination.tls_key), str(destination.tls_cert), "-pw"]
    elif destination.tls_ca:
        args += ["+tla"]  # TLS without a client certificate
    if destination.tls_ca:
        args += ["+cf", str(destination.tls_ca)]  # verify the PACS against this CA
    return args


def echo(destination: Destination) -> ToolRun:
    """C-ECHO: does the PACS accept an association from us at all?"""
    return run("echoscu", ["-v", *association_args(destination),
                           destination.host, str(destination.port)], network=True)


def echo_reached(result: ToolRun) -> bool:
    """Did the PACS take the association? A C-ECHO answered, or an association accepted
    without the Verification service (a PACS that offers storage only answers "No
    Acceptable Presentation Contexts"): it is up, and only a send can tell more."""
    return result.exit_code == 0 or any(
        "No Acceptable Presentation Contexts" in line for line in result.lines)
