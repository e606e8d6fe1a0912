/* What both C peers of tests/test_vring_c.py share: argument parsing, errors, kicks over
 * pipes, mapping the region's POSIX shm object, and laying the queue out with Linux's own
 * vring_init()/vring_size() and checking that against the layout's offsets. */
#ifndef VRING_PEER_H
#define VRING_PEER_H

#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/virtio_ring.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define WAKE_TIMEOUT_MS 10000 /* a sleep no kick ends within this is a lost wake-up */

static struct vring vr;
static unsigned char *base;

static void die(const char *fmt, ...)
{
    va_list ap;
    fputs("FAIL ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(2);
}

static unsigned long long arg(char **argv, int i)
{
    char *end;
    unsigned long long v = strtoull(argv[i], &end, 0);
    if (*argv[i] == '\0' || *end != '\0')
        die("bad argument %d: %s", i, argv[i]);
    return v;
}

/* Block until the other side kicks (or closes the pipe when `eof_ok`); return the bytes read. */
static unsigned wait_kick(int eof_ok)
{
    struct pollfd p = {.fd = 0, .events = POLLIN};
    char buf[4096];
    if (poll(&p, 1, WAKE_TIMEOUT_MS) == 0)
        die("lost wake-up: no kick within %d ms", WAKE_TIMEOUT_MS);
    ssize_t got = read(0, buf, sizeof buf);
    if (got < 0 || (got == 0 && !eof_ok))
        die("kick pipe closed while waiting");
    return (unsigned)got;
}

static unsigned char *map_region(const char *name)
{
    char path[256];
    struct stat st;
    snprintf(path, sizeof path, "/dev/shm/%s", name);
    int fd = open(path, O_RDWR);
    if (fd < 0 || fstat(fd, &st) < 0)
        die("cannot open %s", path);
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        die("cannot map %s", path);
    close(fd);
    return p;
}

/* vring_init() at ring_offset; die unless vring_size() and the avail/used offsets agree with
 * the layout's. */
static void init_vring(unsigned num, unsigned long align, uint64_t ring_offset,
                       unsigned long ring_size, uint64_t avail_offset, uint64_t used_offset)
{
    if (vring_size(num, align) != ring_size)
        die("vring_size(%u, %lu) = %u, the layout says %lu", num, align, vring_size(num, align),
            ring_size);
    vring_init(&vr, num, base + ring_offset, align);
    if ((unsigned char *)vr.avail - base != (long)avail_offset ||
        (unsigned char *)vr.used - base != (long)used_offset)
        die("vring_init places avail/used at %ld/%ld, the layout at %llu/%llu",
            (long)((unsigned char *)vr.avail - base), (long)((unsigned char *)vr.used - base),
            (unsigned long long)avail_offset, (unsigned long long)used_offset);
}

#endif
