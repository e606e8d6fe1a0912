/* Plays the virtio *device* of one ivshmem_comm queue whose driver is Python's TxRing.
 *
 * Built at test time by tests/test_vring_c.py against <linux/virtio_ring.h>, so the queue's
 * layout is checked against Linux's own vring_init()/vring_size() rather than our Python.
 *
 * usage: vring_device SHM_NAME QUEUE_OFFSET RING_OFFSET AVAIL_OFFSET USED_OFFSET NUM ALIGN
 *                     RING_SIZE DATA_OFFSET DATA_SIZE SESSION COUNT
 * stdin: kick bytes from the driver; stdout: kick bytes to the driver; stderr: one report line,
 * "OK messages=.. arms=.. sleeps=.. kicks_in=.. kicks_out=..", or "FAIL why" (exit 2).
 *
 * It resets its half of the queue (device line session word, used ring, avail_event), waits
 * for the driver's session, then consumes COUNT messages: each descriptor must be one whole
 * first span (header total == len - 16, tag == sequence number, payload pattern as
 * test_vring_c.payload()). It completes everything it has read, kicks when
 * vring_need_event(used_event) says so, and sleeps with EVENT_IDX (avail_event, full fence,
 * re-check) when the ring is empty: a sleep that no kick ends within 10 s is a lost wake-up.
 */
#include "vring_peer.h"

#define SPIN 2000
#define SLOW_EVERY 4096 /* stall now and then so that the driver fills the ring and waits */

static uint64_t data_offset, data_size;

static void kick(void)
{
    if (write(1, "k", 1) != 1)
        die("kick write failed");
}

static void check_message(unsigned slot, unsigned msg)
{
    uint16_t head = __atomic_load_n(&vr.avail->ring[slot], __ATOMIC_RELAXED);
    if (head != slot)
        die("message %u: avail ring[%u] = %u, not in order", msg, slot, head);
    struct vring_desc *d = &vr.desc[head];
    uint64_t addr = __atomic_load_n(&d->addr, __ATOMIC_RELAXED);
    uint32_t len = __atomic_load_n(&d->len, __ATOMIC_RELAXED);
    uint16_t flags = __atomic_load_n(&d->flags, __ATOMIC_RELAXED);
    if (flags != 0 || addr % 16 || addr < data_offset || len < 16 ||
        addr + len > data_offset + data_size)
        die("message %u: descriptor addr=%llu len=%u flags=%u", msg, (unsigned long long)addr,
            len, flags);
    const unsigned char *span = base + addr; /* addr is an offset from the region start */
    uint64_t total;
    int32_t tag;
    uint32_t hflags;
    memcpy(&total, span, 8);
    memcpy(&tag, span + 8, 4);
    memcpy(&hflags, span + 12, 4);
    if (hflags != 1 || total != len - 16 || tag != (int32_t)msg)
        die("message %u: header total=%llu tag=%d flags=%u in a %u-byte span", msg,
            (unsigned long long)total, tag, hflags, len);
    for (uint64_t i = 0; i < total; i++)
        if (span[16 + i] != (unsigned char)((msg % 251 + i) * 131 + 7))
            die("message %u: payload byte %llu is wrong", msg, (unsigned long long)i);
}

int main(int argc, char **argv)
{
    if (argc != 13)
        die("usage: see the comment at the top of vring_device.c");
    alarm(120);
    base = map_region(argv[1]);
    uint64_t queue_offset = arg(argv, 2), ring_offset = arg(argv, 3);
    uint64_t avail_offset = arg(argv, 4), used_offset = arg(argv, 5);
    unsigned num = (unsigned)arg(argv, 6);
    unsigned long align = arg(argv, 7), ring_size = arg(argv, 8);
    data_offset = arg(argv, 9);
    data_size = arg(argv, 10);
    uint64_t session = arg(argv, 11);
    unsigned count = (unsigned)arg(argv, 12);

    init_vring(num, align, ring_offset, ring_size, avail_offset, used_offset);

    uint64_t *driver_line = (uint64_t *)(base + queue_offset);
    uint64_t *device_line = (uint64_t *)(base + queue_offset + 64);
    /* Reset our half as RxRing.reset does: session 0, indices, then the session. */
    __atomic_store_n(device_line, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&vr.used->idx, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&vr.used->flags, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&vring_avail_event(&vr), 0, __ATOMIC_RELEASE);
    __atomic_store_n(device_line, session, __ATOMIC_RELEASE);
    while (__atomic_load_n(driver_line, __ATOMIC_ACQUIRE) != session)
        usleep(100);

    uint16_t last_avail = 0, used_idx = 0;
    unsigned msg = 0, spins = 0, arms = 0, sleeps = 0, kicks_in = 0, kicks_out = 0;
    while (msg < count) {
        uint16_t avail_idx = __atomic_load_n(&vr.avail->idx, __ATOMIC_ACQUIRE);
        if (avail_idx == last_avail) {
            if (++spins < SPIN)
                continue;
            spins = 0;
            __atomic_store_n(&vring_avail_event(&vr), last_avail, __ATOMIC_RELEASE);
            arms++;
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (__atomic_load_n(&vr.avail->idx, __ATOMIC_ACQUIRE) != last_avail)
                continue;
            sleeps++;
            kicks_in += wait_kick(0);
            continue;
        }
        if ((uint16_t)(avail_idx - used_idx) > num)
            die("avail.idx %u is more than %u ahead of used.idx %u", avail_idx, num, used_idx);
        while (last_avail != avail_idx && msg < count) {
            check_message(last_avail & (num - 1), msg);
            last_avail++;
            if (++msg % SLOW_EVERY == 0)
                usleep(2000);
        }
        for (uint16_t i = used_idx; i != last_avail; i++) {
            unsigned slot = i & (num - 1);
            vr.used->ring[slot].id = slot;
            vr.used->ring[slot].len = 0;
        }
        uint16_t old = used_idx;
        used_idx = last_avail;
        __atomic_store_n(&vr.used->idx, used_idx, __ATOMIC_RELEASE);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (vring_need_event(__atomic_load_n(&vring_used_event(&vr), __ATOMIC_ACQUIRE),
                             used_idx, old)) {
            kicks_out++;
            kick();
        }
    }
    for (unsigned got; (got = wait_kick(1)) != 0;)
        kicks_in += got;
    fprintf(stderr, "OK messages=%u arms=%u sleeps=%u kicks_in=%u kicks_out=%u\n", msg, arms,
            sleeps, kicks_in, kicks_out);
    return 0;
}
