/* A fake v4l2loopback output device for tests, loaded with LD_PRELOAD.
 *
 * This machine's kernel has no module loader, so v4l2loopback cannot exist here.  The shim makes
 * any path that starts with $FAKE_V4L2_PREFIX behave like a v4l2loopback output node for the two
 * ioctls pyvirtualcam's native backend (and avatar_agent's device probe) issue:
 *   VIDIOC_QUERYCAP -> driver "v4l2 loopback", capabilities VIDEO_OUTPUT
 *   VIDIOC_S_FMT    -> accepted; "<width> <height> <fourcc>" is appended to $FAKE_V4L2_LOG
 * open/write/close go to the real file (a regular file or a FIFO the test reads), so the bytes
 * pyvirtualcam writes are exactly what a consumer of /dev/videoN would read.
 *
 * Build: gcc -shared -fPIC -o fakev4l2.so fakev4l2.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/videodev2.h>

#define MAX_FD 4096
static char fake_fd[MAX_FD];

static int is_fake_path(const char *path) {
    const char *prefix = getenv("FAKE_V4L2_PREFIX");
    return path && prefix && prefix[0] && strncmp(path, prefix, strlen(prefix)) == 0;
}

static void mark(int fd, const char *path) {
    if (fd >= 0 && fd < MAX_FD) fake_fd[fd] = (char)is_fake_path(path);
}

static int open_common(const char *sym, const char *path, int flags, va_list ap) {
    int (*real)(const char *, int, ...) = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, sym);
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE)) mode = (mode_t)va_arg(ap, int);
    int fd = real(path, flags, mode);
    mark(fd, path);
    return fd;
}

int open(const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags);
    int fd = open_common("open", path, flags, ap);
    va_end(ap); return fd;
}

int open64(const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags);
    int fd = open_common("open64", path, flags, ap);
    va_end(ap); return fd;
}

static int openat_common(const char *name, int dirfd, const char *path, int flags, va_list ap) {
    int (*real)(int, const char *, int, ...) = (int (*)(int, const char *, int, ...))dlsym(RTLD_NEXT, name);
    mode_t mode = (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
    int fd = real(dirfd, path, flags, mode);
    mark(fd, path);
    return fd;
}

int openat(int dirfd, const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags);
    int fd = openat_common("openat", dirfd, path, flags, ap);
    va_end(ap); return fd;
}

int openat64(int dirfd, const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags);
    int fd = openat_common("openat64", dirfd, path, flags, ap);
    va_end(ap); return fd;
}

int close(int fd) {
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "close");
    if (fd >= 0 && fd < MAX_FD) fake_fd[fd] = 0;
    return real(fd);
}

int ioctl(int fd, unsigned long request, ...) {
    va_list ap; va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (fd >= 0 && fd < MAX_FD && fake_fd[fd]) {
        if (request == VIDIOC_QUERYCAP) {
            struct v4l2_capability *cap = arg;
            memset(cap, 0, sizeof(*cap));
            strcpy((char *)cap->driver, "v4l2 loopback");
            strcpy((char *)cap->card, "fake avatar-agent");
            strcpy((char *)cap->bus_info, "platform:v4l2loopback-000");
            cap->version = 0x000c07;
            cap->device_caps = V4L2_CAP_VIDEO_OUTPUT | V4L2_CAP_STREAMING;
            cap->capabilities = cap->device_caps | V4L2_CAP_DEVICE_CAPS;
            return 0;
        }
        if (request == VIDIOC_S_FMT) {
            struct v4l2_format *f = arg;
            const char *log = getenv("FAKE_V4L2_LOG");
            if (log && log[0]) {
                FILE *fp = fopen(log, "a");
                if (fp) {
                    unsigned pf = f->fmt.pix.pixelformat;
                    fprintf(fp, "%u %u %c%c%c%c\n", f->fmt.pix.width, f->fmt.pix.height,
                            pf & 0xff, (pf >> 8) & 0xff, (pf >> 16) & 0xff, (pf >> 24) & 0xff);
                    fclose(fp);
                }
            }
            return 0;
        }
        return 0; /* other ioctls: pretend success, like a permissive driver */
    }
    int (*real)(int, unsigned long, ...) = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    return real(fd, request, arg);
}
