/* The wall clock of a process, shifted by the seconds written in $CLOCKJUMP_FILE (re-read at
 * most every 50 ms), for the fault campaign's "clock-jump": CLOCK_REALTIME, gettimeofday and
 * time() jump; CLOCK_MONOTONIC and the kernel's file times do not, as on a host whose clock
 * an NTP step moves. (Debian's libfaketime 0.9.10 cannot leave the monotonic clock alone
 * under Python 3.11: its clock_nanosleep fails with EINVAL, libfaketime issue #426.) */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);
static clock_gettime_fn real_clock_gettime;
static long long offset_ns, read_at_ns = -1;

static long long shift(void) {
    struct timespec mono;
    if (!real_clock_gettime) real_clock_gettime = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    real_clock_gettime(CLOCK_MONOTONIC, &mono);
    long long now = mono.tv_sec * 1000000000LL + mono.tv_nsec;
    if (read_at_ns < 0 || now - read_at_ns > 50000000LL) {
        read_at_ns = now;
        const char *path = getenv("CLOCKJUMP_FILE");
        int fd = path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
        if (fd >= 0) {
            char buf[32] = {0};
            if (read(fd, buf, sizeof buf - 1) > 0) offset_ns = (long long)(atof(buf) * 1e9);
            close(fd);
        }
    }
    return offset_ns;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    long long off = shift();
    int rc = real_clock_gettime(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
        long long t = ts->tv_sec * 1000000000LL + ts->tv_nsec + off;
        ts->tv_sec = t / 1000000000LL;
        ts->tv_nsec = t % 1000000000LL;
    }
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return -1;
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = ts.tv_nsec / 1000;
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
