"""A crash-safe in-place stamping: which files a dcmodify run was given is written (and
synced) before it starts, so that after a crash every original it left as <file>.bak goes
back, unless someone copied a newer file over the path since (that one stays)."""

from __future__ import annotations

import os
from pathlib import Path

from importer import dcmtk
from importer.config import Settings
from importer.folders import display
from importer.logs import event
from importer.model import folder_hash


def intent_path(settings: Settings, folder_name: str) -> Path:
    return settings.state_dir / "stamping" / f"{folder_hash(folder_name)}.paths"


def write_intent(intent: Path, paths: list[str]) -> None:
    intent.parent.mkdir(parents=True, exist_ok=True)
    with open(intent, "wb") as fh:
        fh.write(b"\0".join(os.fsencode(p) for p in paths))
        fh.flush()
        os.fsync(fh.fileno())


def recover_interrupted_stamp(settings: Settings, folder_name: str) -> int:
    """Put back every <file>.bak a stamping of this folder left; return how many."""
    intent = intent_path(settings, folder_name)
    try:
        listed = intent.read_bytes()
    except FileNotFoundError:
        return 0
    restored = 0
    backed_up = [p for p in map(os.fsdecode, filter(None, listed.split(b"\0")))
                 if os.path.lexists(p + ".bak")]
    ours = _written_by_dcmodify(backed_up)
    for path in backed_up:
        if path in ours:
            os.replace(path + ".bak", path)
            restored += 1
        else:  # copied again since: the newer file stays, the original it replaced goes
            os.unlink(path + ".bak")
            event("INFO", "%s: replaced after an interrupted stamping; the newer copy is kept",
                  display(path))
    intent.unlink()
    return restored


def _written_by_dcmodify(paths: list[str]) -> set[str]:
    """Which of these paths hold what an interrupted dcmodify wrote over its .bak (one more
    Original Attributes item than the .bak, or not readable whole: a partial write), not a
    copy someone put there since (chaos seed 121: the .bak went back over it, and the newer
    copy was lost)."""
    present = [p for p in paths if os.path.lexists(p)]
    if not present:
        return set()
    dumps = dcmtk.dump_tags([*present, *(p + ".bak" for p in present)],
                            (dcmtk.ORIGINAL_ATTRIBUTES,))
    ours = set(paths) - set(present)  # nothing there: the .bak goes back
    for path in present:
        after, original = dumps[path], dumps[path + ".bak"]
        count = int(after.values.get(dcmtk.ORIGINAL_ATTRIBUTES) or 0)
        if after.error or original.error or count == int(
                original.values.get(dcmtk.ORIGINAL_ATTRIBUTES) or 0) + 1:
            ours.add(path)
    return ours
