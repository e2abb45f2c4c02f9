#!/bin/sh
# Container entrypoint. It ends by exec'ing tini (PID 1: forwards signals, reaps children)
# with the command as tini's child; no root process stays behind.
#
# Started as root (the default): give the `importer` user the uid/gid in PUID/PGID (as NAS
# users expect, e.g. Synology 1026/100), make the importer's directories usable by it, then
# drop privileges with setpriv (util-linux) and exec tini + the command as that user.
# Started as another user (`docker run --user UID:GID`): exec tini + the command, nothing else.
#
# Directories, when started as root (SKIP_CHOWN=true turns this off):
#   LOG_DIR, STATE_DIR     the importer's own files: everything in them not owned by
#                          PUID:PGID is given to it (the old scripts ran as root, so an
#                          existing log/log.log is root's).
#   IMPORT_DIR, ARCHIVE_DIR, FAILED_DIR
#                          created if missing; the directory itself (never its contents:
#                          an archive can be huge) is given to PUID:PGID only when that user
#                          cannot write to it.
set -eu

# -s: reap as a subreaper too when not PID 1 (e.g. `docker run --init`), without a warning.
TINI="tini -s --"

if [ "$(id -u)" != 0 ]; then
    exec $TINI "$@"
fi

PUID=${PUID:-1000}
PGID=${PGID:-1000}
for pair in "PUID=$PUID" "PGID=$PGID"; do
    case ${pair#*=} in
        '' | *[!0-9]*)
            echo "[ERROR] $pair: must be a numeric user/group id" >&2
            exit 2
            ;;
    esac
done

if [ "$PUID" = 0 ]; then
    echo "[WARN] PUID=0: running as root" >&2
    exec $TINI "$@"
fi

# Give the ids a name (ps, ls -l, `docker exec -u importer`). -o: the id may belong to an
# existing group already (PGID=100 is `users`). A read-only root filesystem cannot be
# changed: the numeric ids are used as they are.
if [ "$(id -g importer)" != "$PGID" ]; then
    groupmod -o -g "$PGID" importer 2>/dev/null \
        || echo "[WARN] cannot set group importer to gid $PGID; using the number" >&2
fi
if [ "$(id -u importer)" != "$PUID" ]; then
    usermod -o -u "$PUID" -g "$PGID" importer 2>/dev/null \
        || echo "[WARN] cannot set user importer to uid $PUID; using the number" >&2
fi

as_user() {
    setpriv --reuid="$PUID" --regid="$PGID" --clear-groups --no-new-privs -- "$@"
}

own_tree() {  # everything under $1 belongs to the importer
    [ -n "$1" ] || return 0
    mkdir -p "$1"
    find "$1" -xdev \( ! -user "$PUID" -o ! -group "$PGID" \) \
        -exec chown -h "$PUID:$PGID" {} + 2>/dev/null \
        || echo "[WARN] could not give everything in $1 to $PUID:$PGID" >&2
}

own_dir() {  # the importer can create and rename entries in $1
    [ -n "$1" ] || return 0
    if [ ! -d "$1" ]; then
        mkdir -p "$1"
        chown "$PUID:$PGID" "$1"
    elif ! as_user test -w "$1" -a -x "$1"; then
        chown "$PUID:$PGID" "$1" 2>/dev/null \
            || echo "[WARN] $1 is not writable by $PUID:$PGID and cannot be chowned" >&2
    fi
}

case ${SKIP_CHOWN:-false} in
    1 | true | yes) ;;
    *)
        own_tree "${LOG_DIR:-/data/log}"
        own_tree "${STATE_DIR:-/data/state}"
        own_dir "${IMPORT_DIR:-/dicom/import}"
        own_dir "${ARCHIVE_DIR:-/dicom/archived}"
        own_dir "${FAILED_DIR:-/dicom/failed}"
        ;;
esac

# CAP_LEASE (compose: cap_add: [LEASE]) lets the importer ask, by a read lease, whether any
# process (smbd, another container) still has a file open for writing, also for files it
# does not own. Kept across the switch to PUID as an ambient capability, and only that one.
KEEP_LEASE=""
if setpriv -d 2>/dev/null | grep -q '^Capability bounding set:.*[ ,]lease\(,\|$\)'; then
    KEEP_LEASE="--inh-caps=+lease --ambient-caps=+lease"
fi

export HOME=/nonexistent USER=importer LOGNAME=importer
# shellcheck disable=SC2086
exec setpriv --reuid="$PUID" --regid="$PGID" --clear-groups $KEEP_LEASE --no-new-privs \
    -- $TINI "$@"
