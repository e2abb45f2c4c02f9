"""The only place that runs a DCMTK tool: argv in, parsed results out, one module per tool
(runner: how any tool runs; dump: dcmftest, dcmdump; modify: dcmodify, dcmconv and the
decompressors; store: storescu; echo: echoscu and the association's arguments; find:
findscu). Paths travel as surrogateescape strings both ways, so a file name that is not
valid UTF-8 reaches the tool byte for byte and comes back in its output as the same Python
string.
"""

from importer.dcmtk.dump import (
    BIRTH_DATE,
    CHARSET,
    MEDIA_STORAGE_SOP_CLASS,
    ORIGINAL_ATTRIBUTES,
    PATIENT_ID,
    PATIENT_NAME,
    PIXEL_DATA_TAGS,
    ROWS,
    SEX,
    SOP_CLASS,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    TRANSFER_SYNTAX,
    Dump,
    dicom_magic,
    dump_tags,
)
from importer.dcmtk.echo import echo, echo_reached
from importer.dcmtk.find import FindResult, find_instances
from importer.dcmtk.modify import (
    convert_to_utf8,
    convert_un,
    decompress,
    decompression_tool,
    original_attributes_args,
    set_charset,
    stamp_identity,
)
from importer.dcmtk.runner import (
    DcmtkMissing,
    Stopped,
    ToolRun,
    chunked,
    mask_patient_name,
    request_stop,
    run,
    stop_requested,
    tool_path,
    versions,
)
from importer.dcmtk.store import (
    Outcome,
    StoreResult,
    classify_status,
    proposal_for,
    store,
)

__all__ = [
    "BIRTH_DATE", "CHARSET", "MEDIA_STORAGE_SOP_CLASS", "ORIGINAL_ATTRIBUTES", "PATIENT_ID",
    "PATIENT_NAME",
    "PIXEL_DATA_TAGS", "ROWS", "SEX", "SOP_CLASS", "SOP_INSTANCE_UID", "STUDY_INSTANCE_UID",
    "TRANSFER_SYNTAX", "DcmtkMissing", "Dump", "FindResult", "Outcome", "Stopped",
    "StoreResult", "ToolRun", "chunked", "classify_status", "convert_to_utf8", "convert_un",
    "decompress", "decompression_tool", "dicom_magic", "dump_tags", "echo", "echo_reached",
    "find_instances",
    "mask_patient_name", "original_attributes_args", "proposal_for", "request_stop", "run",
    "set_charset", "stamp_identity", "stop_requested", "store", "tool_path", "versions",
]
