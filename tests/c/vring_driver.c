/* Plays the virtio *driver* of one ivshmem_comm queue whose device is Python's RxRing.
 *
 * Built at test time by tests/test_vring_c.py against <linux/virtio_ring.h>.
 *
 * usage: vring_driver SHM_NAME QUEUE_OFFSET RING_OFFSET AVAIL_OFFSET USED_OFFSET NUM ALIGN
 *                     RING_SIZE DATA_OFFSET DATA_SIZE MAX_SPAN SESSION COUNT
 * stdin: kick bytes from the device; stdout: kick bytes to the device; stderr: one report line,
 * "OK messages=.. arms=.. sleeps=.. kicks_in=.. kicks_out=..", or "FAIL why" (exit 2).
 *
 * It resets its half (driver line session word, avail ring, used_event), waits for the
 * device's session, then publishes COUNT one-span messages: descriptor slot s owns the data
 * slice [s * slot, (s + 1) * slot) of the data area (slot = min(max_span, data_size / num),
 * 16-aligned); message m carries (m * 37) % (slot - 15) payload bytes of the pattern of
 * test_vring_c.payload() with tag m. It kicks when vring_need_event(avail_event) says so, and
 * when the ring is full sleeps with EVENT_IDX (used_event, full fence, re-check): a sleep that
 * no kick ends within 10 s is a lost wake-up. Used elements must be in order with len 0.
 */
#include "vring_peer.h"

#define SPIN 2000
#define SLOW_EVERY 4096 /* pause now and then so that the device empties the ring and sleeps */

static uint16_t avail_shadow, last_used;
static unsigned arms, sleeps, kicks_in, kicks_out;

/* Consume the used ring; return how many descriptors came back. */
static unsigned reclaim(void)
{
    uint16_t used_idx = __atomic_load_n(&vr.used->idx, __ATOMIC_ACQUIRE);
    uint16_t pending = used_idx - last_used, in_flight = avail_shadow - last_used;
    if (pending > in_flight)
        die("used.idx %u: %u completions but %u in flight", used_idx, pending, in_flight);
    for (uint16_t i = 0; i < pending; i++, last_used++) {
        unsigned slot = last_used & (vr.num - 1);
        uint32_t id = __atomic_load_n(&vr.used->ring[slot].id, __ATOMIC_RELAXED);
        uint32_t len = __atomic_load_n(&vr.used->ring[slot].len, __ATOMIC_RELAXED);
        if (id != slot || len != 0)
            die("used ring[%u] = {id %u, len %u}", slot, id, len);
    }
    return pending;
}

/* Wait until at least one descriptor comes back: spin, then EVENT_IDX sleep. */
static void reclaim_or_wait(void)
{
    for (unsigned spins = 0;; spins++) {
        if (reclaim())
            return;
        if (spins < SPIN)
            continue;
        __atomic_store_n(&vring_used_event(&vr), last_used, __ATOMIC_RELEASE);
        arms++;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (reclaim())
            return;
        sleeps++;
        kicks_in += wait_kick(0);
        spins = 0;
    }
}

int main(int argc, char **argv)
{
    if (argc != 14)
        die("usage: see the comment at the top of vring_driver.c");
    alarm(120);
    base = map_region(argv[1]);
    uint64_t queue_offset = arg(argv, 2), ring_offset = arg(argv, 3);
    uint64_t avail_offset = arg(argv, 4), used_offset = arg(argv, 5);
    unsigned num = (unsigned)arg(argv, 6);
    unsigned long align = arg(argv, 7), ring_size = arg(argv, 8);
    uint64_t data_offset = arg(argv, 9), data_size = arg(argv, 10), max_span = arg(argv, 11);
    uint64_t session = arg(argv, 12);
    unsigned count = (unsigned)arg(argv, 13);

    init_vring(num, align, ring_offset, ring_size, avail_offset, used_offset);
    uint64_t slot_bytes = (data_size / num < max_span ? data_size / num : max_span) & ~15ULL;
    if (slot_bytes < 16)
        die("data area of %llu bytes too small for %u slots", (unsigned long long)data_size, num);

    uint64_t *driver_line = (uint64_t *)(base + queue_offset);
    uint64_t *device_line = (uint64_t *)(base + queue_offset + 64);
    /* Reset our half as TxRing.reset does: session 0, indices, then the session. */
    __atomic_store_n(driver_line, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&vr.avail->idx, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&vr.avail->flags, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&vring_used_event(&vr), 0, __ATOMIC_RELEASE);
    __atomic_store_n(driver_line, session, __ATOMIC_RELEASE);
    while (__atomic_load_n(device_line, __ATOMIC_ACQUIRE) != session)
        usleep(100);

    for (unsigned msg = 0; msg < count; msg++) {
        while ((uint16_t)(avail_shadow - last_used) == num)
            reclaim_or_wait();
        unsigned slot = avail_shadow & (num - 1);
        uint64_t addr = data_offset + slot * slot_bytes;
        uint64_t total = (uint64_t)msg * 37 % (slot_bytes - 15);
        int32_t tag = (int32_t)msg;
        uint32_t hflags = 1;
        unsigned char *span = base + addr;
        memcpy(span, &total, 8);
        memcpy(span + 8, &tag, 4);
        memcpy(span + 12, &hflags, 4);
        for (uint64_t i = 0; i < total; i++)
            span[16 + i] = (unsigned char)((msg % 251 + i) * 131 + 7);
        vr.desc[slot].addr = addr; /* an offset from the region start, not a pointer */
        vr.desc[slot].len = (uint32_t)(16 + total);
        vr.desc[slot].flags = 0;
        vr.desc[slot].next = 0;
        vr.avail->ring[slot] = (uint16_t)slot;
        uint16_t old = avail_shadow++;
        __atomic_store_n(&vr.avail->idx, avail_shadow, __ATOMIC_RELEASE);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (vring_need_event(__atomic_load_n(&vring_avail_event(&vr), __ATOMIC_ACQUIRE),
                             avail_shadow, old)) {
            kicks_out++;
            if (write(1, "k", 1) != 1)
                die("kick write failed");
        }
        if (msg % SLOW_EVERY == SLOW_EVERY - 1)
            usleep(2000);
    }
    while (avail_shadow != last_used)
        reclaim_or_wait();
    for (unsigned got; (got = wait_kick(1)) != 0;)
        kicks_in += got;
    fprintf(stderr, "OK messages=%u arms=%u sleeps=%u kicks_in=%u kicks_out=%u\n", count, arms,
            sleeps, kicks_in, kicks_out);
    return 0;
}
