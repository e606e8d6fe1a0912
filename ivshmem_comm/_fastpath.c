/* ivshmem_comm._fastpath: the C accelerator of ivshmem_comm.virtqueue.
 *
 * TxRing (virtio driver, the sender) and RxRing (virtio device, the receiver) with the same
 * constructor, methods, return values, errors and byte-level behaviour as the pure-Python
 * reference in virtqueue.py, so that a Python half and a C half interoperate on one queue.
 * The region format lives in layout.py; the constants below mirror it.
 *
 * Memory ordering. Every index and session word shared with the peer is accessed with
 * __atomic builtins; the labels are those of virtqueue.py:
 *   [R1] driver's release store of avail.idx  <-> [A1] device's acquire load of it
 *   [R2] device's release store of used.idx   <-> [A2] driver's acquire load of it
 *   [F1] full fence between the driver's avail.idx store and its avail_event load, paired
 *        with the device's fence between its avail_event store and its avail.idx re-load
 *   [F2] the same for used.idx / used_event
 *   [S1] driver-line session word (driver stores, device loads); [S2] device-line session word
 * Descriptors, ring entries and span headers written by the peer are read once (relaxed
 * atomic loads into locals: no double fetch) after the acquire load that publishes them,
 * then validated. A violation raises RingCorruptError and marks the ring broken for good.
 *
 * Memory safety. The constructor checks that the whole queue lies inside the buffer it holds
 * for its lifetime; after that every access to the rings is at an index masked by Q-1, and
 * every access to the data area is bounds-checked against it, so no value the peer writes
 * can make this code touch memory outside the queue.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "_typepack.h" /* part 2: derived-datatype pack/unpack */
#include "_memexport.h" /* part 3: MemoryExporter (MPI.Win's buffer) */
#include "_p2preq.h"    /* part 4: the MPI face's request objects */

#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sched.h>
#include <time.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#include <x86intrin.h> /* __rdtsc: copy_to_reader's cost of a copy */
#endif

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the region format is little-endian and this module stores native integers"
#endif

/* Mirrors of layout.py. */
#define CONTROL_SIZE 256
#define DRIVER_LINE_OFFSET 0
#define DEVICE_LINE_OFFSET 64
#define DRIVER_COUNTERS_OFFSET 128
#define DEVICE_COUNTERS_OFFSET 192
#define SPAN_HEADER_SIZE 16
#define SPAN_ALIGN 16
#define HDR_F_FIRST 1u
#define MAX_MESSAGE (1ULL << 48)
#define CACHE_WINDOW (4 << 20) /* layout.CACHE_WINDOW */
#define LIVE_RECEIVER_NS 500000
#define RECLAIM_FIRST (16 << 10)
#define PIPE_SPAN_MIN (16 << 10)
#define PIPE_PIECES 4
#define TAG_MAX 0x7FFFFFFFL
#define QUEUE_NUM_MAX 32768
#define CACHE_LINE 64
/* A member's block of a collective slot (layout.py, "Collective area"): per cell c an
 * arrive line at c * COLL_LINE_STRIDE, the sleep line, then the cells' slabs. */
#define COLL_CELLS 2
#define COLL_SCATTER_LENGTHS 12 /* collective.SCATTER_LENGTHS */
/* A broadcast of at most this many bytes rides in the root's arrive line too, in the words
 * after its rounds word (collective.BCAST_INLINE): a member reads it from the line whose
 * seq it just loaded instead of taking the slab's line next, one dependent transfer between
 * the CPUs fewer (the root still fills its slab, which the Python steps read). */
#define COLL_BCAST_INLINE 32
/* A scatterv block of at least this many bytes goes into the root's slab with stores that
 * bypass the caches (copy_bytes_streaming): its reader read those lines two rounds ago, so each
 * plain store would first fetch its line from the reader's cache (a read for ownership). On a
 * 2-vCPU EPYC guest, one process writing 32 KiB / 64 KiB / 128 KiB that another then reads
 * (xcore2.py in the session notes): plain stores 13.6 / 7.9 / 15.1 us, streaming 2.1 / 3.2 /
 * 5.5 us; the reader's copy goes from 2.8 / 2.3 / 3.8 to 2.8 / 4.5 / 7.9 us (from memory). */
#define COLL_STREAM_MIN 16384
#define COLL_LINE_STRIDE (2 * 64)
#define COLL_SLEEP_OFFSET (COLL_CELLS * COLL_LINE_STRIDE)
#define COLL_SLAB_OFFSET (COLL_SLEEP_OFFSET + COLL_LINE_STRIDE)
#define COLL_SEQ_BITS 40
#define COLL_SEQ_MASK ((1ULL << 40) - 1)
/* Copies at least this large run with the GIL released. */
#define NOGIL_COPY_MIN (64 * 1024)

/* Result codes of TxRing.send_small (virtqueue.SEND_*). */
#define SEND_OK 0
#define SEND_KICK 1
#define SEND_FULL (-1)
#define SEND_TOO_BIG (-2)
/* TxRing.reserve: room only past the cache window while the receiver keeps up
 * (virtqueue.RESERVE_LATER). */
#define RESERVE_LATER (-3)
#define SEND_ERROR (-4) /* (internal: tx_send_bytes failed, an error set) */

/* Counter words of a counters line (layout.COUNTER_NAMES_*). */
enum { CNT_MESSAGES = 0, CNT_BYTES = 1, CNT_WAITS = 2, CNT_KICKS = 3 };

static PyObject *RingCorruptError;
static PyObject *CollectiveTruncatedError; /* (a RingCorruptError: see coll_take) */
static PyObject *PeerLostError;

struct vring_desc_le {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_used_elem_le {
    uint32_t id;
    uint32_t len;
};

/* Data-relative [start, end) of one published descriptor's share of the byte ring. */
struct span {
    uint32_t start;
    uint32_t end;
};

/* ------------------------------------------------------------------------------------------
 * Ring: what both halves share. All pointers point into `view`, held for the object's life.
 * ------------------------------------------------------------------------------------------ */
typedef struct {
    PyObject_HEAD
    Py_buffer view;
    PyObject *broken; /* the RingCorruptError that broke this ring, or NULL */
    long long peer;   /* the other side, named in every error */
    struct vring_desc_le *desc;
    uint16_t *avail_flags, *avail_idx, *avail_ring, *used_event;
    uint16_t *used_flags, *used_idx, *avail_event;
    struct vring_used_elem_le *used_ring;
    uint64_t *own_line;  /* the control line this half writes (its session word) */
    uint64_t *own_counters; /* the counters line this half writes (layout.COUNTERS) */
    uint64_t *peer_line; /* the control line the other half writes */
    unsigned char *base; /* region start */
    Py_ssize_t data_offset, data_end, data_size, max_span;
    unsigned long long session;
    uint32_t num, mask;
    bool synced;
} Ring;

typedef struct {
    Ring ring;
    struct span *inflight; /* Q entries, indexed by descriptor slot; live ones are
                              [last_used, avail_shadow) */
    uint16_t avail_shadow; /* next index to publish; never read back from shared memory */
    uint16_t last_used;    /* next used-ring index to consume */
    Py_ssize_t head;       /* data-relative start of the next allocation */
    Py_ssize_t reserve_cursor, reserve_end; /* open reservation; reserve_end -1: none */
    /* After a reservation found no room: the used index at which enough will be free (arm()
     * asks to be kicked only then, not at every completion), valid while wake_set. */
    uint16_t wake_at;
    bool wake_set;
    /* monotonic_ns() of the last reclaim that took completions back: the receiver keeps up
     * for LIVE_RECEIVER_NS after it; since later_ns (0: none) reservations got RESERVE_LATER,
     * once for that long the queue is `cooled` until the head is back at the bottom
     * (virtqueue.TxRing: same fields). */
    uint64_t live_ns, later_ns;
    bool cooled;
} TxRing;

static uint64_t monotonic_ns(void);

typedef struct {
    Ring ring;
    uint16_t next_avail; /* next available-ring index to peek */
    uint16_t avail_seen; /* last avail.idx loaded and validated */
    uint16_t last_used;  /* shadow of used.idx */
} RxRing;

static inline bool need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

static inline Py_ssize_t align_up(Py_ssize_t value, Py_ssize_t align)
{
    return (value + align - 1) & ~(align - 1);
}

static inline void full_fence_impl(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static void count(Ring *r, int index, uint64_t amount)
{
    /* Statistics only: single writer (this half owns the line), read by `status` unordered. */
    uint64_t *word = r->own_counters + index;
    __atomic_store_n(word, __atomic_load_n(word, __ATOMIC_RELAXED) + amount, __ATOMIC_RELAXED);
}

/* Copy with the GIL released when the copy is large. Both buffers are held by the caller. */
static void copy_bytes(unsigned char *dest, const unsigned char *src, Py_ssize_t n)
{
    if (n >= NOGIL_COPY_MIN) {
        Py_BEGIN_ALLOW_THREADS
        memmove(dest, src, (size_t)n);
        Py_END_ALLOW_THREADS
    } else {
        memmove(dest, src, (size_t)n);
    }
}

/* memcpy with stores that bypass the caches (x86 with SSE2; elsewhere a plain memcpy), the
 * stores done (sfence) on return. The buffers do not overlap. Callers hold or released the GIL
 * as they need. */
static void stream_raw(unsigned char *dest, const unsigned char *src, size_t left)
{
#if defined(__SSE2__)
    size_t lead = (16 - ((uintptr_t)dest & 15)) & 15;
    if (lead > left)
        lead = left;
    memcpy(dest, src, lead);
    dest += lead;
    src += lead;
    left -= lead;
    for (; left >= 64; left -= 64, src += 64, dest += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)src);
        __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
        _mm_stream_si128((__m128i *)dest, a);
        _mm_stream_si128((__m128i *)(dest + 16), b);
        _mm_stream_si128((__m128i *)(dest + 32), c);
        _mm_stream_si128((__m128i *)(dest + 48), d);
    }
    memcpy(dest, src, left);
    _mm_sfence(); /* the streamed stores are done before the span is completed */
#else
    memcpy(dest, src, left);
#endif
}

/* copy_bytes() with stores that bypass the caches, for a receiver copying out a message too
 * large to stay there: no read for ownership of `dest`, and the queue's data and the sender's
 * next bytes are not evicted for bytes nobody reads soon (16 MiB MPI ping-pong in pieces:
 * ~830 -> ~720 us one way). The buffers do not overlap. */
static void copy_bytes_streaming(unsigned char *dest, const unsigned char *src, Py_ssize_t n)
{
    Py_BEGIN_ALLOW_THREADS
    stream_raw(dest, src, (size_t)n);
    Py_END_ALLOW_THREADS
}

/* Copies into shared memory that another process reads next (a message into a queue, a
 * broadcast into the root's slab, a member's block into its slab for a gather or an
 * allgather; TxRing.send_small, publish_payload and write, and the C rounds) of at least
 * SHARED_COPY_MIN bytes choose between plain stores and stores that bypass the caches
 * (copy_to_reader) by what each cost on this process lately. Why: the cost of plain stores
 * to lines the reader's core read swings with where the host runs the two vCPUs, seconds
 * apart in one launch. On a 2-vCPU EPYC guest, 1 MiB copies into a 4 MiB ring window that the
 * other process then copies out (xr2.c in the session notes, writer / reader us): plain 22-26
 * / 22 in one mode, 370-420 / 80-90 in the other (a local copy stays 22-24 in both);
 * streaming 37-38 / 37-45 in both. The cost of a method is TSC ticks per KiB, the lower of
 * its last two copies (one preempted copy never decides). Streaming is used when its cost
 * times the class's weight is below the plain one's; two classes by the size of the whole
 * message (a piece of a large one is timed with it): below SHARED_LARGE_MIN the lines the
 * reader read sit in its own cache, and streaming won in both modes (2 ranks, ways
 * interleaved per block of 20 in one launch, p10 us plain / streaming: fast mode gather 64
 * KiB 8.8 / 5.4, Bcast 64 KiB 8.8 / 4.4, ping-pong 256 KiB 27.9 / 23.9; slow mode 31.6 /
 * 5.4, 31.4 / 4.7, 117.7 / 23.2), weight 1; from SHARED_LARGE_MIN on they sit in the shared
 * L3 in the fast mode, where plain won (ping-pong 1 MiB 38.4 / 69.2; slow mode 595 / 58),
 * and the writer's cost undercounts streaming (its reader reads from memory) while a plain
 * copy right after streamed ones pays for lines no cache holds: weight 4 (ping-pong 1 MiB,
 * p10 / p50: weight 1 45 / 63, 2 42 / 56, 4 40 / 47). The method not chosen is tried again
 * after `probe_every` copies of the class (from SHARED_PROBE_MIN, doubling while it stays
 * the dearer, up to SHARED_PROBE_MAX), so that a change of mode is followed within a few
 * copies one way and SHARED_PROBE_MAX copies the other. State of the process, read and
 * written with the GIL held. */
#define SHARED_COPY_MIN (16 << 10)
#define SHARED_LARGE_MIN (512 << 10)
#define SHARED_PROBE_MIN 4
#define SHARED_PROBE_MAX 256
enum { SC_PLAIN = 0, SC_STREAM = 1 };
typedef struct {
    uint64_t cost[2][2]; /* [method][newest, older]: ticks per KiB; 0: not measured yet */
    unsigned probe_in, probe_every;
    uint64_t weight; /* of the streaming cost */
} SharedCopy;
static SharedCopy shared_copy[2] = { /* [whole message >= SHARED_LARGE_MIN] */
    {{{0, 0}, {0, 0}}, SHARED_PROBE_MIN, SHARED_PROBE_MIN, 1},
    {{{0, 0}, {0, 0}}, SHARED_PROBE_MIN, SHARED_PROBE_MIN, 4},
};

static uint64_t shared_copy_cost(const SharedCopy *sc, int method)
{
    uint64_t a = sc->cost[method][0], b = sc->cost[method][1];
    return a == 0 || b == 0 ? 0 : a < b ? a : b; /* unmeasured: tried first */
}

static int shared_copy_choice(const SharedCopy *sc)
{
    return shared_copy_cost(sc, SC_STREAM) * sc->weight < shared_copy_cost(sc, SC_PLAIN)
               ? SC_STREAM
               : SC_PLAIN;
}

static PyObject *shared_copy_costs(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    PyObject *classes[2];
    for (int k = 0; k < 2; k++) {
        uint64_t(*c)[2] = shared_copy[k].cost;
        classes[k] = Py_BuildValue("((KK)(KK))", (unsigned long long)c[SC_PLAIN][0],
                                   (unsigned long long)c[SC_PLAIN][1],
                                   (unsigned long long)c[SC_STREAM][0],
                                   (unsigned long long)c[SC_STREAM][1]);
        if (classes[k] == NULL) {
            Py_XDECREF(classes[0]);
            return NULL;
        }
    }
    return Py_BuildValue("(NN)", classes[0], classes[1]);
}

/* Copy `n` bytes that another process reads next from `src` into shared memory at `dest`, a
 * piece of a message of `whole` bytes (see above; below SHARED_COPY_MIN a plain copy), with
 * the GIL released when the copy is large (as copy_bytes). Called with the GIL held. The
 * buffers do not overlap. */
static void copy_to_reader(unsigned char *dest, const unsigned char *src, Py_ssize_t n,
                           long long whole)
{
#if defined(__SSE2__)
    if (n < SHARED_COPY_MIN) {
        memcpy(dest, src, (size_t)n);
        return;
    }
    SharedCopy *sc = &shared_copy[whole >= SHARED_LARGE_MIN];
    int chosen = shared_copy_choice(sc);
    int probe = --sc->probe_in == 0;
    int method = probe ? !chosen : chosen;
    uint64_t began = __rdtsc();
    if (n >= NOGIL_COPY_MIN) {
        Py_BEGIN_ALLOW_THREADS
        if (method == SC_STREAM)
            stream_raw(dest, src, (size_t)n);
        else
            memcpy(dest, src, (size_t)n);
        Py_END_ALLOW_THREADS
    } else if (method == SC_STREAM) {
        stream_raw(dest, src, (size_t)n);
    } else {
        memcpy(dest, src, (size_t)n);
    }
    uint64_t ticks = __rdtsc() - began; /* (a migration between CPUs: one odd sample) */
    uint64_t *cost = sc->cost[method];
    cost[1] = cost[0];
    cost[0] = ticks * 1024 / (uint64_t)n + 1;
    int now = shared_copy_choice(sc);
    if (now != chosen) /* a change of mode: watch the other closely again */
        sc->probe_every = SHARED_PROBE_MIN;
    else if (probe && sc->probe_every < SHARED_PROBE_MAX)
        sc->probe_every *= 2;
    if (probe || now != chosen)
        sc->probe_in = sc->probe_every;
#else
    (void)whole;
    copy_bytes(dest, src, n);
#endif
}

/* ------------------------------------------------------------------------------------------
 * Errors
 * ------------------------------------------------------------------------------------------ */

/* Raise RingCorruptError(peer, field, value, detail) and keep it as `broken`. Steals the three
 * references (any may be NULL after a failed build: the pending error is then kept). */
static PyObject *ring_corrupt(Ring *r, PyObject *field, PyObject *value, PyObject *detail)
{
    if (field != NULL && value != NULL && detail != NULL) {
        PyObject *err = PyObject_CallFunction(RingCorruptError, "LOOO", r->peer, field, value,
                                              detail);
        if (err != NULL) {
            Py_XSETREF(r->broken, err);
            PyErr_SetObject((PyObject *)Py_TYPE(err), err);
        }
    }
    Py_XDECREF(field);
    Py_XDECREF(value);
    Py_XDECREF(detail);
    return NULL;
}

static PyObject *raise_broken(Ring *r)
{
    PyErr_SetObject((PyObject *)Py_TYPE(r->broken), r->broken);
    return NULL;
}

static PyObject *peer_lost(Ring *r, const char *detail)
{
    PyObject *err = PyObject_CallFunction(PeerLostError, "Ls", r->peer, detail);
    if (err != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(err), err);
        Py_DECREF(err);
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------
 * Argument helpers
 * ------------------------------------------------------------------------------------------ */

/* An int argument as long long. Returns 0, 1 if it does not fit (no error set), -1 on error. */
static int as_long_long(PyObject *obj, long long *out)
{
    int overflow;
    *out = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow)
        return 1;
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int as_session(PyObject *obj, unsigned long long *out)
{
    *out = PyLong_AsUnsignedLongLong(obj);
    if (*out == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Format(PyExc_ValueError, "session %S out of range 0..2**64-1", obj);
        return -1;
    }
    return 0;
}

static int as_tag(PyObject *obj, long *out)
{
    *out = PyLong_AsLong(obj);
    if (*out == -1 && PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_OverflowError))
        return -1;
    if (PyErr_Occurred() || *out < 0 || *out > TAG_MAX) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "tag %S out of range 0..%ld", obj, TAG_MAX);
        return -1;
    }
    return 0;
}

static int check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t expected)
{
    if (nargs == expected)
        return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd arguments (%zd given)", name, expected,
                 nargs);
    return -1;
}

/* ------------------------------------------------------------------------------------------
 * Construction
 * ------------------------------------------------------------------------------------------ */

static int geometry_field(PyObject *geometry, const char *name, Py_ssize_t *out)
{
    PyObject *value = PyObject_GetAttrString(geometry, name);
    if (value == NULL)
        return -1;
    *out = PyLong_AsSsize_t(value);
    Py_DECREF(value);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static bool is_pow2(Py_ssize_t v)
{
    return v > 0 && (v & (v - 1)) == 0;
}

/* Check the geometry and that the queue lies inside the buffer; set every pointer. */
static int ring_init(Ring *r, PyObject *args, PyObject *kwds, bool driver)
{
    static char *kwlist[] = {"region_buf", "queue_offset", "geometry", "peer", NULL};
    PyObject *region_buf, *geometry;
    Py_ssize_t queue_offset, q, align, data_size, max_span, ring_rel, data_rel;
    long long peer;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnOL", kwlist, &region_buf, &queue_offset,
                                     &geometry, &peer))
        return -1;
    if (geometry_field(geometry, "queue_num", &q) < 0 ||
        geometry_field(geometry, "vring_align", &align) < 0 ||
        geometry_field(geometry, "data_size", &data_size) < 0 ||
        geometry_field(geometry, "max_span", &max_span) < 0 ||
        geometry_field(geometry, "ring_rel_offset", &ring_rel) < 0 ||
        geometry_field(geometry, "data_rel_offset", &data_rel) < 0)
        return -1;
    if (!is_pow2(q) || q < 2 || q > QUEUE_NUM_MAX) {
        PyErr_Format(PyExc_ValueError, "queue_num must be a power of two in 2..%d, got %zd",
                     QUEUE_NUM_MAX, q);
        return -1;
    }
    if (!is_pow2(align) || align < 4) {
        PyErr_Format(PyExc_ValueError, "vring_align must be a power of two >= 4, got %zd",
                     align);
        return -1;
    }
    if (data_size < SPAN_ALIGN || data_size % SPAN_ALIGN || data_size >= (Py_ssize_t)1 << 32) {
        PyErr_Format(PyExc_ValueError,
                     "data_size must be a multiple of %d below 4 GiB, got %zd", SPAN_ALIGN,
                     data_size);
        return -1;
    }
    if (max_span < SPAN_ALIGN || max_span > data_size || max_span % SPAN_ALIGN) {
        PyErr_Format(PyExc_ValueError,
                     "max_span must be a multiple of %d in %d..data_size, got %zd", SPAN_ALIGN,
                     SPAN_ALIGN, max_span);
        return -1;
    }
    Py_ssize_t used_rel = align_up(16 * q + 2 * (3 + q), align);
    Py_ssize_t vring_bytes = used_rel + 6 + 8 * q;
    if (ring_rel < CONTROL_SIZE || ring_rel % SPAN_ALIGN || data_rel % SPAN_ALIGN ||
        data_rel < ring_rel + vring_bytes) {
        PyErr_Format(PyExc_ValueError,
                     "ring_rel_offset %zd and data_rel_offset %zd leave no room for the "
                     "control block and a %zd-byte vring",
                     ring_rel, data_rel, vring_bytes);
        return -1;
    }

    Py_buffer view;
    if (PyObject_GetBuffer(region_buf, &view, PyBUF_WRITABLE) < 0)
        return -1;
    if (queue_offset < 0 || queue_offset > view.len - data_rel - data_size ||
        ((uintptr_t)view.buf + (uintptr_t)queue_offset) % 8) {
        PyErr_Format(PyExc_ValueError,
                     "queue at offset %zd (%zd bytes) does not lie 8-byte aligned in a "
                     "%zd-byte buffer",
                     queue_offset, data_rel + data_size, view.len);
        PyBuffer_Release(&view);
        return -1;
    }
    if (r->view.obj != NULL)
        PyBuffer_Release(&r->view);
    r->view = view;

    unsigned char *queue = (unsigned char *)view.buf + queue_offset;
    unsigned char *ring = queue + ring_rel;
    unsigned char *avail = ring + 16 * q;
    unsigned char *used = ring + used_rel;
    r->base = view.buf;
    r->peer = peer;
    r->num = (uint32_t)q;
    r->mask = (uint32_t)q - 1;
    r->desc = (struct vring_desc_le *)ring;
    r->avail_flags = (uint16_t *)avail;
    r->avail_idx = (uint16_t *)avail + 1;
    r->avail_ring = (uint16_t *)avail + 2;
    r->used_event = (uint16_t *)avail + 2 + q;
    r->used_flags = (uint16_t *)used;
    r->used_idx = (uint16_t *)used + 1;
    r->used_ring = (struct vring_used_elem_le *)(used + 4);
    r->avail_event = (uint16_t *)(used + 4 + 8 * q);
    uint64_t *driver_line = (uint64_t *)(queue + DRIVER_LINE_OFFSET);
    uint64_t *device_line = (uint64_t *)(queue + DEVICE_LINE_OFFSET);
    r->own_line = driver ? driver_line : device_line;
    r->own_counters =
        (uint64_t *)(queue + (driver ? DRIVER_COUNTERS_OFFSET : DEVICE_COUNTERS_OFFSET));
    r->peer_line = driver ? device_line : driver_line;
    r->data_offset = queue_offset + data_rel;
    r->data_end = r->data_offset + data_size;
    r->data_size = data_size;
    r->max_span = max_span;
    r->session = 0;
    r->synced = false;
    Py_CLEAR(r->broken);
    return 0;
}

static int ring_traverse(Ring *r, visitproc visit, void *arg)
{
    Py_VISIT(r->broken);
    return 0;
}

static int ring_clear(Ring *r)
{
    Py_CLEAR(r->broken);
    return 0;
}

static void ring_release(Ring *r)
{
    PyObject_GC_UnTrack(r);
    Py_CLEAR(r->broken);
    if (r->view.obj != NULL)
        PyBuffer_Release(&r->view);
}

/* ------------------------------------------------------------------------------------------
 * Shared methods and properties
 * ------------------------------------------------------------------------------------------ */

/* True once the peer's control line holds our session ([S1] on the device, [S2] on the
 * driver: acquire; pairs with the release store that ends the peer's reset). A half never
 * reset (session 0) is never in sync. */
static bool ring_sync(Ring *r)
{
    if (!r->synced && r->session != 0 &&
        __atomic_load_n(r->peer_line, __ATOMIC_ACQUIRE) == r->session)
        r->synced = true;
    return r->synced;
}

static PyObject *ring_check_sync(Ring *r, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(ring_sync(r));
}

static PyObject *ring_get_broken(Ring *r, void *Py_UNUSED(closure))
{
    return Py_NewRef(r->broken != NULL ? r->broken : Py_None);
}

/* mark_broken(field, value, detail): a caller found the peer's data wrong; returns the error. */
static PyObject *ring_mark_broken(Ring *r, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("mark_broken", nargs, 3) < 0)
        return NULL;
    PyObject *err = PyObject_CallFunction(RingCorruptError, "LOOO", r->peer, args[0], args[1],
                                          args[2]);
    if (err == NULL)
        return NULL;
    Py_XSETREF(r->broken, Py_NewRef(err));
    return err;
}

static PyObject *ring_count_message(Ring *r, PyObject *nbytes)
{
    unsigned long long n = PyLong_AsUnsignedLongLongMask(nbytes);
    if (n == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    count(r, CNT_MESSAGES, 1);
    count(r, CNT_BYTES, n);
    Py_RETURN_NONE;
}

/* count_full_wait on the driver, count_sleep on the device: the same counter word. */
static PyObject *ring_count_wait(Ring *r, PyObject *Py_UNUSED(ignored))
{
    count(r, CNT_WAITS, 1);
    Py_RETURN_NONE;
}

/* The session word goes to 0 first, so a peer that sees our reset indices also sees that the
 * session it knew is over; the new session is published last. */
static int ring_reset_begin(Ring *r, PyObject *session_obj)
{
    unsigned long long session;
    if (as_session(session_obj, &session) < 0)
        return -1;
    /* [S1]/[S2] release: pairs with the peer's session load after its index load */
    __atomic_store_n(r->own_line, 0, __ATOMIC_RELEASE);
    Py_CLEAR(r->broken);
    r->synced = false;
    r->session = session;
    return 0;
}

static void ring_reset_end(Ring *r)
{
    /* [S1]/[S2] release: after the index resets; pairs with the peer's ring_sync() */
    __atomic_store_n(r->own_line, r->session, __ATOMIC_RELEASE);
}

static PyMemberDef ring_members[] = {
    {"peer", T_LONGLONG, offsetof(Ring, peer), READONLY, "the other side's peer id"},
    {"num", T_UINT, offsetof(Ring, num), READONLY, "queue size Q"},
    {"data_offset", T_PYSSIZET, offsetof(Ring, data_offset), READONLY,
     "region offset of the data area"},
    {"data_size", T_PYSSIZET, offsetof(Ring, data_size), READONLY, "bytes of the data area"},
    {"max_span", T_PYSSIZET, offsetof(Ring, max_span), READONLY, "largest descriptor length"},
    {"session", T_ULONGLONG, offsetof(Ring, session), READONLY,
     "the session this half was last reset for; 0: never reset"},
    {NULL, 0, 0, 0, NULL},
};

/* ------------------------------------------------------------------------------------------
 * TxRing: the driver half and the byte-ring allocator of the data area
 * ------------------------------------------------------------------------------------------ */

static int tx_init(TxRing *self, PyObject *args, PyObject *kwds)
{
    if (ring_init(&self->ring, args, kwds, true) < 0)
        return -1;
    struct span *inflight = PyMem_Realloc(self->inflight, self->ring.num * sizeof(*inflight));
    if (inflight == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->inflight = inflight;
    self->avail_shadow = self->last_used = 0;
    self->head = self->reserve_cursor = 0;
    self->reserve_end = -1;
    self->wake_set = false;
    self->live_ns = self->later_ns = 0;
    self->cooled = false;
    return 0;
}

static void tx_dealloc(TxRing *self)
{
    ring_release(&self->ring);
    PyMem_Free(self->inflight);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *tx_reset(TxRing *self, PyObject *session)
{
    Ring *r = &self->ring;
    if (ring_reset_begin(r, session) < 0)
        return NULL;
    /* [R1] release: pairs with [A1]; the device then finds the zeroed session word */
    __atomic_store_n(r->avail_idx, 0, __ATOMIC_RELEASE);
    __atomic_store_n(r->avail_flags, 0, __ATOMIC_RELAXED); /* unused flags word */
    __atomic_store_n(r->used_event, 0, __ATOMIC_RELEASE);  /* pairs with the device's [F2] */
    self->avail_shadow = self->last_used = 0;
    self->head = self->reserve_cursor = 0;
    self->reserve_end = -1;
    self->wake_set = false;
    self->live_ns = self->later_ns = 0;
    self->cooled = false;
    ring_reset_end(r);
    Py_RETURN_NONE;
}

static uint16_t tx_in_flight(TxRing *self)
{
    return (uint16_t)(self->avail_shadow - self->last_used);
}

static PyObject *tx_reclaim(TxRing *self, PyObject *Py_UNUSED(ignored))
{
    Ring *r = &self->ring;
    if (r->broken != NULL)
        return raise_broken(r);
    if (!ring_sync(r))
        return PyLong_FromLong(0);
    uint16_t used_idx = __atomic_load_n(r->used_idx, __ATOMIC_ACQUIRE); /* [A2]; pairs with [R2] */
    uint16_t pending = (uint16_t)(used_idx - self->last_used);
    if (pending == 0)
        return PyLong_FromLong(0);
    /* [S2] acquire, after [A2]: a reset used.idx comes with the zeroed session word */
    if (__atomic_load_n(r->peer_line, __ATOMIC_ACQUIRE) != r->session) {
        r->synced = false;
        return peer_lost(r, "receiver restarted or left this queue's session");
    }
    uint16_t in_flight = tx_in_flight(self);
    if (pending > in_flight)
        return ring_corrupt(r, PyUnicode_FromString("used.idx"), PyLong_FromLong(used_idx),
                            PyUnicode_FromFormat("%u completions but %u in flight",
                                                 (unsigned)pending, (unsigned)in_flight));
    for (uint16_t i = 0; i < pending; i++) {
        uint32_t slot = self->last_used & r->mask;
        struct vring_used_elem_le *elem = &r->used_ring[slot];
        uint32_t used_id = __atomic_load_n(&elem->id, __ATOMIC_RELAXED);   /* after [A2] */
        uint32_t used_len = __atomic_load_n(&elem->len, __ATOMIC_RELAXED); /* after [A2] */
        if (used_id != slot) /* IN_ORDER: completions come back in publication order */
            return ring_corrupt(r, PyUnicode_FromString("used.ring.id"),
                                PyLong_FromUnsignedLong(used_id),
                                PyUnicode_FromFormat("expected in-order id %u", slot));
        uint32_t span_bytes = self->inflight[slot].end - self->inflight[slot].start;
        if (used_len > span_bytes)
            return ring_corrupt(r, PyUnicode_FromString("used.ring.len"),
                                PyLong_FromUnsignedLong(used_len),
                                PyUnicode_FromFormat("span is %u bytes", span_bytes));
        self->last_used++;
    }
    self->live_ns = monotonic_ns();
    if (self->last_used == self->avail_shadow && self->reserve_end < 0)
        self->head = 0; /* empty: restart at the bottom, so big messages stay contiguous */
    return PyLong_FromLong(pending);
}

/* layout.pipe_span: the piece size a reservation of `nbytes` bytes is published in. */
static long long pipe_span(const Ring *r, long long nbytes)
{
    long long max_span = (long long)r->max_span;
    if (nbytes <= max_span)
        return max_span;
    long long half = r->num / 2 > 0 ? r->num / 2 : 1;
    long long piece = align_up((Py_ssize_t)((nbytes + PIPE_PIECES - 1) / PIPE_PIECES), SPAN_ALIGN);
    long long least = align_up((Py_ssize_t)((nbytes + half - 1) / half), SPAN_ALIGN);
    if (piece < PIPE_SPAN_MIN)
        piece = PIPE_SPAN_MIN;
    if (piece < least)
        piece = least;
    return piece < max_span ? piece : max_span;
}

/* Data-relative start of a free contiguous run of `size` bytes, or -1, were the oldest span in
 * flight to start at data-relative `tail`; `soft` (the receiver keeps up): only within the
 * cache window once the head is in it (virtqueue.TxRing._space_at). */
static Py_ssize_t tx_space_at(TxRing *self, Py_ssize_t tail, Py_ssize_t size, bool soft)
{
    Py_ssize_t head = self->head;
    if (soft && head + size > CACHE_WINDOW)
        return head > tail && tail >= size ? 0 : -1;
    if (head > tail) {
        /* past the cache window with the whole window free at the bottom: wrap early
         * (layout.CACHE_WINDOW) */
        if (head >= CACHE_WINDOW && tail >= CACHE_WINDOW && tail >= size)
            return 0;
        if (self->ring.data_size - head >= size)
            return head;
        return tail >= size ? 0 : -1;
    }
    if (head < tail && tail - head >= size)
        return head;
    return -1;
}

/* A reservation of `size` bytes in `pieces` descriptors found no room: remember the used index
 * at which it will (the fewest completions of what is in flight that free both), for arm(). */
static void tx_note_wait(TxRing *self, Py_ssize_t size, long long pieces, bool soft)
{
    uint16_t in_flight = tx_in_flight(self);
    uint16_t j = 1;
    for (; j < in_flight; j++) {
        if (in_flight - j + pieces > self->ring.num)
            continue;
        Py_ssize_t tail = self->inflight[(uint16_t)(self->last_used + j) & self->ring.mask].start;
        if (tx_space_at(self, tail, size, soft) >= 0)
            break;
    }
    self->wake_at = (uint16_t)(self->last_used + (in_flight ? j : 1));
    self->wake_set = true;
}

/* Open a reservation of `nbytes`: its region offset, -1 if no room (bytes, or descriptors for
 * its pieces of at most max_span) now, RESERVE_LATER if room only past the cache window while
 * the receiver keeps up (virtqueue.TxRing.reserve), -2 with an error set. */
static Py_ssize_t tx_reserve_impl(TxRing *self, long long nbytes)
{
    Ring *r = &self->ring;
    if (r->broken != NULL) { /* a broken queue fails fast: nothing more is published */
        raise_broken(r);
        return -2;
    }
    if (self->reserve_end >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "a reservation is already open");
        return -2;
    }
    if (nbytes <= 0 || nbytes > r->data_size) {
        PyErr_Format(PyExc_ValueError, "%lld bytes never fit a %zd-byte data area", nbytes,
                     r->data_size);
        return -2;
    }
    Py_ssize_t size = align_up((Py_ssize_t)nbytes, SPAN_ALIGN);
    long long span = pipe_span(r, nbytes);
    long long pieces = (nbytes + span - 1) / span; /* descriptors it will take */
    uint16_t in_flight = tx_in_flight(self);
    Py_ssize_t start = 0;
    if (in_flight) {
        Py_ssize_t tail = self->inflight[self->last_used & r->mask].start;
        bool soft = false;
        uint64_t now = 0;
        if (2 * size <= CACHE_WINDOW && CACHE_WINDOW < r->data_size && !self->cooled) {
            now = monotonic_ns();
            soft = now - self->live_ns < LIVE_RECEIVER_NS;
            if (soft && self->later_ns && now - self->later_ns >= LIVE_RECEIVER_NS) {
                soft = false;
                self->cooled = true;
            }
        }
        bool descriptors = in_flight + pieces <= r->num;
        start = descriptors ? tx_space_at(self, tail, size, soft) : -1;
        if (start < 0) {
            tx_note_wait(self, size, pieces, soft);
            if (soft && descriptors && tx_space_at(self, tail, size, false) >= 0) {
                if (!self->later_ns)
                    self->later_ns = now;
                return RESERVE_LATER;
            }
            return -1;
        }
    }
    self->later_ns = 0;
    if (start == 0)
        self->cooled = false;
    self->wake_set = false;
    self->head = start + size;
    self->reserve_cursor = start;
    self->reserve_end = start + size;
    return r->data_offset + start;
}

static PyObject *tx_reserve(TxRing *self, PyObject *nbytes)
{
    long long n;
    int status = as_long_long(nbytes, &n);
    if (status < 0)
        return NULL;
    if (status && self->reserve_end < 0) {
        PyErr_Format(PyExc_ValueError, "%S bytes never fit a %zd-byte data area", nbytes,
                     self->ring.data_size);
        return NULL;
    }
    Py_ssize_t offset = tx_reserve_impl(self, n);
    return offset == -2 ? NULL : PyLong_FromSsize_t(offset);
}

/* Make descriptor avail_shadow available: [R1], [F1], then the EVENT_IDX decision. */
static bool tx_publish_idx(TxRing *self)
{
    Ring *r = &self->ring;
    uint16_t old_idx = self->avail_shadow;
    uint16_t new_idx = self->avail_shadow = (uint16_t)(old_idx + 1);
    /* [R1] release: after the descriptor, ring slot and data; pairs with [A1] */
    __atomic_store_n(r->avail_idx, new_idx, __ATOMIC_RELEASE);
    full_fence_impl(); /* [F1] our avail.idx store before the avail_event load below */
    /* after [F1]; pairs with the device's avail_event store in arm() */
    uint16_t avail_event = __atomic_load_n(r->avail_event, __ATOMIC_ACQUIRE);
    bool kick = need_event(avail_event, new_idx, old_idx) || !r->synced;
    if (kick)
        count(r, CNT_KICKS, 1);
    return kick;
}

/* Publish `length` bytes at data-relative `rel` of the open reservation (checked by caller). */
static bool tx_publish_span(TxRing *self, Py_ssize_t rel, Py_ssize_t length, bool last)
{
    Ring *r = &self->ring;
    Py_ssize_t end = last ? self->reserve_end : rel + align_up(length, SPAN_ALIGN);
    uint32_t slot = self->avail_shadow & r->mask;
    struct vring_desc_le *d = &r->desc[slot];
    d->addr = (uint64_t)(r->data_offset + rel);
    d->len = (uint32_t)length;
    d->flags = 0;
    d->next = 0;
    r->avail_ring[slot] = (uint16_t)slot; /* published by [R1] below */
    self->inflight[slot].start = (uint32_t)rel;
    self->inflight[slot].end = (uint32_t)end;
    if (last)
        self->reserve_end = -1;
    else
        self->reserve_cursor = end;
    return tx_publish_idx(self);
}

/* publish() after its checks: -1 with an error, else whether the device must be kicked. */
static int tx_publish_checked(TxRing *self, long long offset, long long length, int overflow,
                              int last)
{
    Ring *r = &self->ring;
    long long rel = offset - r->data_offset;
    if (overflow || rel != self->reserve_cursor || self->reserve_end < 0 ||
        length > self->reserve_end - rel) {
        PyErr_SetString(PyExc_RuntimeError, "publish outside the open reservation");
        return -1;
    }
    if (length <= 0 || length > r->max_span) {
        PyErr_Format(PyExc_ValueError, "a span carries 1..%zd bytes, not %lld", r->max_span,
                     length);
        return -1;
    }
    if (tx_in_flight(self) >= r->num) {
        PyErr_Format(PyExc_RuntimeError, "publish with all %u descriptors in flight", r->num);
        return -1;
    }
    return tx_publish_span(self, (Py_ssize_t)rel, (Py_ssize_t)length, last);
}

static PyObject *tx_publish(TxRing *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long offset, length;
    int status;
    if (check_nargs("publish", nargs, 3) < 0)
        return NULL;
    int last = PyObject_IsTrue(args[2]);
    if (last < 0)
        return NULL;
    if ((status = as_long_long(args[0], &offset)) < 0)
        return NULL;
    int length_status = as_long_long(args[1], &length);
    if (length_status < 0)
        return NULL;
    int kick = tx_publish_checked(self, offset, length, status || length_status, last);
    return kick < 0 ? NULL : PyBool_FromLong(kick);
}

static int tx_check_write(TxRing *self, long long offset, Py_ssize_t n, int overflow);

/* The rest of a contiguous message whose reservation starts at region `start` (its header
 * written there), `published` bytes of it (header included) already out: the payload `data`
 * written and published in spans of pipe_span() bytes laid end to end, the first span carrying
 * the header. Stops when all is published or after a publication that must be kicked; returns
 * (published, kick) for the caller to kick and call again. */
static PyObject *tx_publish_payload(TxRing *self, PyObject *const *args, Py_ssize_t nargs)
{
    Ring *r = &self->ring;
    long long start, published;
    Py_buffer data;
    if (check_nargs("publish_payload", nargs, 3) < 0 || as_long_long(args[0], &start) ||
        as_long_long(args[2], &published)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "publish_payload: arguments out of range");
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    long long total = SPAN_HEADER_SIZE + data.len; /* bytes of the reservation */
    if (published < 0 || published > total) {
        PyErr_Format(PyExc_ValueError, "%lld of %lld bytes published", published, total);
        PyBuffer_Release(&data);
        return NULL;
    }
    int kick = 0;
    long long span = pipe_span(r, total);
    while (published < total && !kick) {
        long long piece = total - published < span ? total - published : span;
        long long skip = published < SPAN_HEADER_SIZE ? SPAN_HEADER_SIZE - published : 0;
        if (piece > skip) { /* the payload bytes of this piece (the header is written) */
            if (tx_check_write(self, start + published + skip, (Py_ssize_t)(piece - skip), 0) < 0)
                goto fail;
            copy_to_reader(r->base + start + published + skip,
                           (const unsigned char *)data.buf + published + skip - SPAN_HEADER_SIZE,
                           (Py_ssize_t)(piece - skip), data.len);
        }
        kick = tx_publish_checked(self, start + published, piece, 0, published + piece == total);
        if (kick < 0)
            goto fail;
        published += piece;
    }
    PyBuffer_Release(&data);
    return Py_BuildValue("(LO)", published, kick ? Py_True : Py_False);
fail:
    PyBuffer_Release(&data);
    return NULL;
}

static void tx_store_header(Ring *r, Py_ssize_t offset, uint64_t total, uint32_t tag)
{
    unsigned char *h = r->base + offset; /* published by [R1] with its descriptor */
    uint32_t flags = HDR_F_FIRST;
    memcpy(h, &total, 8);
    memcpy(h + 8, &tag, 4);
    memcpy(h + 12, &flags, 4);
}

/* A message of `len` bytes at `buf` written whole into one span and published: SEND_OK or
 * SEND_KICK (the device must be kicked); SEND_TOO_BIG (more than one span), SEND_FULL (no
 * room now) or RESERVE_LATER (tx_reserve_impl's), nothing written; SEND_ERROR with an error set (the ring's). Shared by
 * send_small and P2PLane.send. */
static int tx_send_bytes(TxRing *self, uint32_t tag, const void *buf, Py_ssize_t len)
{
    Ring *r = &self->ring;
    Py_ssize_t length = SPAN_HEADER_SIZE + len;
    if (length > r->max_span)
        return SEND_TOO_BIG;
    if (len >= RECLAIM_FIRST && tx_in_flight(self)) { /* layout.RECLAIM_FIRST */
        PyObject *taken = tx_reclaim(self, NULL);
        if (taken == NULL)
            return SEND_ERROR;
        Py_DECREF(taken);
    }
    Py_ssize_t offset = tx_reserve_impl(self, length);
    if (offset < 0)
        return offset == -2 ? SEND_ERROR : offset == RESERVE_LATER ? RESERVE_LATER : SEND_FULL;
    tx_store_header(r, offset, (uint64_t)len, tag);
    copy_to_reader(r->base + offset + SPAN_HEADER_SIZE, buf, len, len);
    count(r, CNT_MESSAGES, 1);
    count(r, CNT_BYTES, (uint64_t)len);
    return tx_publish_span(self, offset - r->data_offset, length, true) ? SEND_KICK : SEND_OK;
}

static PyObject *tx_send_small(TxRing *self, PyObject *const *args, Py_ssize_t nargs)
{
    long tag;
    Py_buffer data;
    if (check_nargs("send_small", nargs, 2) < 0 || as_tag(args[0], &tag) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    int status = tx_send_bytes(self, (uint32_t)tag, data.buf, data.len);
    PyBuffer_Release(&data);
    return status == SEND_ERROR ? NULL : PyLong_FromLong(status);
}

/* Check that [offset, offset + n) lies in the open reservation's unpublished part. */
static int tx_check_write(TxRing *self, long long offset, Py_ssize_t n, int overflow)
{
    long long rel = offset - self->ring.data_offset;
    if (overflow || self->reserve_end < 0 || rel < self->reserve_cursor ||
        n > self->reserve_end - rel) {
        PyErr_SetString(PyExc_RuntimeError, "write outside the open reservation");
        return -1;
    }
    return 0;
}

static PyObject *tx_write(TxRing *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long offset;
    Py_buffer data;
    int status;
    if (check_nargs("write", nargs, 2) < 0 || (status = as_long_long(args[0], &offset)) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    if (tx_check_write(self, offset, data.len, status) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    copy_to_reader(self->ring.base + offset, data.buf, data.len, data.len);
    PyBuffer_Release(&data);
    Py_RETURN_NONE;
}

static PyObject *tx_write_header(TxRing *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long offset;
    long tag;
    int status;
    if (check_nargs("write_header", nargs, 3) < 0 ||
        (status = as_long_long(args[0], &offset)) < 0)
        return NULL;
    unsigned long long total = PyLong_AsUnsignedLongLong(args[1]);
    if ((total == (unsigned long long)-1 && PyErr_Occurred()) || total > MAX_MESSAGE) {
        if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "total %S out of range 0..%llu", args[1], MAX_MESSAGE);
        return NULL;
    }
    if (as_tag(args[2], &tag) < 0 || tx_check_write(self, offset, SPAN_HEADER_SIZE, status) < 0)
        return NULL;
    tx_store_header(&self->ring, (Py_ssize_t)offset, total, (uint32_t)tag);
    Py_RETURN_NONE;
}

static PyObject *tx_arm(TxRing *self, PyObject *Py_UNUSED(ignored))
{
    Ring *r = &self->ring;
    /* Kicked at the completion that makes room for the reservation that found none
     * (tx_note_wait), else at the next one: not once per span the device gives back. */
    uint16_t ahead = self->wake_set ? (uint16_t)(self->wake_at - self->last_used) : 1;
    if (ahead == 0 || ahead > tx_in_flight(self))
        ahead = 1;
    /* used_event store: pairs with the device's load after its [F2] */
    __atomic_store_n(r->used_event, (uint16_t)(self->last_used + ahead - 1), __ATOMIC_RELEASE);
    full_fence_impl(); /* [F2] our used_event store before the used.idx load below */
    uint16_t used_idx = __atomic_load_n(r->used_idx, __ATOMIC_ACQUIRE); /* [A2]; pairs with [R2] */
    return PyBool_FromLong((uint16_t)(used_idx - self->last_used) >= ahead || !ring_sync(r));
}

static PyObject *tx_get_in_flight(TxRing *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(tx_in_flight(self));
}

static PyMethodDef tx_methods[] = {
    {"mark_broken", (PyCFunction)(void (*)(void))ring_mark_broken, METH_FASTCALL,
     "mark_broken(field, value, detail): break the ring for good; return the error."},
    {"reset", (PyCFunction)tx_reset, METH_O,
     "Forget everything in flight and start session `session` (owner: this driver)."},
    {"check_sync", (PyCFunction)ring_check_sync, METH_NOARGS,
     "True once the device half holds our session."},
    {"reclaim", (PyCFunction)tx_reclaim, METH_NOARGS,
     "Consume the used ring: free every completed descriptor's span. Returns how many."},
    {"reserve", (PyCFunction)tx_reserve, METH_O,
     "Reserve `nbytes` contiguous bytes of the data area; return their region offset, -1 (no "
     "room) or RESERVE_LATER (virtqueue.TxRing.reserve)."},
    {"publish", (PyCFunction)(void (*)(void))tx_publish, METH_FASTCALL,
     "publish(offset, length, last): publish a piece of the open reservation; True: kick."},
    {"publish_payload", (PyCFunction)(void (*)(void))tx_publish_payload, METH_FASTCALL,
     "publish_payload(start, data, published) -> (published, kick)"},
    {"send_small", (PyCFunction)(void (*)(void))tx_send_small, METH_FASTCALL,
     "send_small(tag, data): one-span message; SEND_OK, SEND_KICK, SEND_FULL, RESERVE_LATER or "
     "SEND_TOO_BIG."},
    {"write", (PyCFunction)(void (*)(void))tx_write, METH_FASTCALL,
     "write(offset, data): copy `data` into the open reservation at region `offset`."},
    {"write_header", (PyCFunction)(void (*)(void))tx_write_header, METH_FASTCALL,
     "write_header(offset, total, tag): write a first-span header in the open reservation."},
    {"count_message", (PyCFunction)ring_count_message, METH_O,
     "Add one message of `nbytes` to the driver line's counters."},
    {"count_full_wait", (PyCFunction)ring_count_wait, METH_NOARGS,
     "Count one wait for space."},
    {"arm", (PyCFunction)tx_arm, METH_NOARGS,
     "Ask to be kicked at the next completion; True if one already arrived."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef tx_getset[] = {
    {"broken", (getter)ring_get_broken, NULL, "the error that broke this ring, or None", NULL},
    {"in_flight", (getter)tx_get_in_flight, NULL, "descriptors published, not completed", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TxRingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ivshmem_comm._fastpath.TxRing",
    .tp_doc = "Driver half of one queue plus the byte-ring allocator of its data area.\n\n"
              "TxRing(region_buf, queue_offset, geometry, peer); then reset(session).",
    .tp_basicsize = sizeof(TxRing),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)tx_init,
    .tp_dealloc = (destructor)tx_dealloc,
    .tp_traverse = (traverseproc)ring_traverse,
    .tp_clear = (inquiry)ring_clear,
    .tp_methods = tx_methods,
    .tp_members = ring_members,
    .tp_getset = tx_getset,
};

/* ------------------------------------------------------------------------------------------
 * RxRing: the device half
 * ------------------------------------------------------------------------------------------ */

static int rx_init(RxRing *self, PyObject *args, PyObject *kwds)
{
    if (ring_init(&self->ring, args, kwds, false) < 0)
        return -1;
    self->next_avail = self->avail_seen = self->last_used = 0;
    return 0;
}

static void rx_dealloc(RxRing *self)
{
    ring_release(&self->ring);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *rx_reset(RxRing *self, PyObject *session)
{
    Ring *r = &self->ring;
    if (ring_reset_begin(r, session) < 0)
        return NULL;
    /* [R2] release: pairs with [A2]; the driver then finds the zeroed session word */
    __atomic_store_n(r->used_idx, 0, __ATOMIC_RELEASE);
    __atomic_store_n(r->used_flags, 0, __ATOMIC_RELAXED); /* unused flags word */
    __atomic_store_n(r->avail_event, 0, __ATOMIC_RELEASE); /* pairs with the driver's [F1] */
    self->next_avail = self->avail_seen = self->last_used = 0;
    ring_reset_end(r);
    Py_RETURN_NONE;
}

static uint16_t rx_held(RxRing *self)
{
    return (uint16_t)(self->next_avail - self->last_used);
}

/* Peek the next published span. Returns 1 with the span stored, 0 if none, -1 on error. */
static int rx_poll_impl(RxRing *self, uint64_t *addr_out, uint32_t *len_out)
{
    Ring *r = &self->ring;
    if (r->broken != NULL) {
        raise_broken(r);
        return -1;
    }
    if (self->next_avail == self->avail_seen) {
        if (!ring_sync(r))
            return 0;
        uint16_t avail_idx = __atomic_load_n(r->avail_idx, __ATOMIC_ACQUIRE); /* [A1]; [R1] */
        if (avail_idx == self->avail_seen)
            return 0;
        /* [S1] acquire, after [A1]: a reset avail.idx comes with the zeroed session word */
        if (__atomic_load_n(r->peer_line, __ATOMIC_ACQUIRE) != r->session) {
            r->synced = false;
            peer_lost(r, "sender restarted or left this queue's session");
            return -1;
        }
        if ((uint16_t)(avail_idx - self->last_used) > r->num) {
            ring_corrupt(r, PyUnicode_FromString("avail.idx"), PyLong_FromLong(avail_idx),
                         PyUnicode_FromFormat("more than %u entries ahead of used.idx", r->num));
            return -1;
        }
        if ((uint16_t)(avail_idx - self->next_avail) > r->num) {
            ring_corrupt(r, PyUnicode_FromString("avail.idx"), PyLong_FromLong(avail_idx),
                         PyUnicode_FromString("moved backwards"));
            return -1;
        }
        self->avail_seen = avail_idx;
    }
    uint32_t slot = self->next_avail & r->mask;
    uint16_t head = __atomic_load_n(&r->avail_ring[slot], __ATOMIC_RELAXED); /* after [A1] */
    if (head != slot) { /* IN_ORDER: descriptors are made available in table order */
        ring_corrupt(r, PyUnicode_FromString("avail.ring"), PyLong_FromLong(head),
                     PyUnicode_FromFormat("expected in-order head %u", slot));
        return -1;
    }
    struct vring_desc_le *d = &r->desc[slot];
    uint64_t addr = __atomic_load_n(&d->addr, __ATOMIC_RELAXED);     /* after [A1] */
    uint32_t length = __atomic_load_n(&d->len, __ATOMIC_RELAXED);    /* after [A1] */
    uint16_t flags = __atomic_load_n(&d->flags, __ATOMIC_RELAXED);   /* after [A1] */
    if (flags != 0) {
        ring_corrupt(r, PyUnicode_FromFormat("desc[%u].flags", slot), PyLong_FromLong(flags),
                     PyUnicode_FromString("NEXT/WRITE/INDIRECT not used"));
        return -1;
    }
    if (addr < (uint64_t)r->data_offset || addr % SPAN_ALIGN) {
        ring_corrupt(r, PyUnicode_FromFormat("desc[%u].addr", slot),
                     PyLong_FromUnsignedLongLong(addr),
                     PyUnicode_FromString("outside this queue's data area"));
        return -1;
    }
    if (length == 0 || length > (uint64_t)r->max_span || addr > (uint64_t)r->data_end ||
        length > (uint64_t)r->data_end - addr) {
        ring_corrupt(r, PyUnicode_FromFormat("desc[%u].len", slot),
                     PyLong_FromUnsignedLong(length),
                     PyUnicode_FromFormat("span at %llu must lie in the data area",
                                          (unsigned long long)addr));
        return -1;
    }
    self->next_avail++;
    *addr_out = addr;
    *len_out = length;
    return 1;
}

static PyObject *rx_poll(RxRing *self, PyObject *Py_UNUSED(ignored))
{
    uint64_t addr;
    uint32_t length;
    int found = rx_poll_impl(self, &addr, &length);
    if (found <= 0)
        return found < 0 ? NULL : Py_NewRef(Py_None);
    return Py_BuildValue("(KI)", (unsigned long long)addr, (unsigned int)length);
}

/* Decode the first-span header of a span inside the data area (the caller checked that
 * [offset, offset + 16) lies there and is 8-byte aligned). 0, or -1 with the ring broken. */
static int rx_read_header_impl(RxRing *self, Py_ssize_t offset, uint64_t length,
                               uint64_t *total_out, int32_t *tag_out)
{
    Ring *r = &self->ring;
    const unsigned char *h = r->base + offset;
    /* span data: published by [R1] and loaded after [A1]; each field read once */
    uint64_t total = __atomic_load_n((const uint64_t *)h, __ATOMIC_RELAXED);
    int32_t tag = __atomic_load_n((const int32_t *)(h + 8), __ATOMIC_RELAXED);
    uint32_t flags = __atomic_load_n((const uint32_t *)(h + 12), __ATOMIC_RELAXED);
    if (flags != HDR_F_FIRST) {
        ring_corrupt(r, PyUnicode_FromString("header.flags"), PyLong_FromUnsignedLong(flags),
                     PyUnicode_FromString("expected the first-span flag"));
        return -1;
    }
    if (total > MAX_MESSAGE || length - SPAN_HEADER_SIZE > total) {
        ring_corrupt(r, PyUnicode_FromString("header.total"),
                     PyLong_FromUnsignedLongLong(total),
                     PyUnicode_FromFormat("first span carries %llu bytes",
                                          (unsigned long long)length));
        return -1;
    }
    if (tag < 0) {
        ring_corrupt(r, PyUnicode_FromString("header.tag"), PyLong_FromLong(tag),
                     PyUnicode_FromString("tags are non-negative"));
        return -1;
    }
    *total_out = total;
    *tag_out = tag;
    return 0;
}

static PyObject *short_span(RxRing *self, PyObject *length)
{
    return ring_corrupt(&self->ring, PyUnicode_FromString("span.len"), Py_NewRef(length),
                        PyUnicode_FromString("first span shorter than its header"));
}

static PyObject *rx_read_header(RxRing *self, PyObject *const *args, Py_ssize_t nargs)
{
    Ring *r = &self->ring;
    long long offset, length;
    int status, length_status;
    if (check_nargs("read_header", nargs, 2) < 0 ||
        (status = as_long_long(args[0], &offset)) < 0 ||
        (length_status = as_long_long(args[1], &length)) < 0)
        return NULL;
    if (!length_status && length < SPAN_HEADER_SIZE)
        return short_span(self, args[1]);
    if (status || length_status || offset < r->data_offset ||
        offset > r->data_end - SPAN_HEADER_SIZE || (offset - r->data_offset) % SPAN_ALIGN) {
        PyErr_Format(PyExc_ValueError, "no span of the data area starts at %S", args[0]);
        return NULL;
    }
    uint64_t total;
    int32_t tag;
    if (rx_read_header_impl(self, (Py_ssize_t)offset, (uint64_t)length, &total, &tag) < 0)
        return NULL;
    return Py_BuildValue("(Ki)", (unsigned long long)total, (int)tag);
}

/* Decode and count the first-span header of the span just peeked. 0, or -1 with the ring
 * broken. */
static int rx_header(RxRing *self, uint64_t addr, uint32_t length, uint64_t *total,
                     int32_t *tag)
{
    if (length < SPAN_HEADER_SIZE) {
        PyObject *length_obj = PyLong_FromUnsignedLong(length);
        if (length_obj != NULL) {
            Py_XDECREF(short_span(self, length_obj));
            Py_DECREF(length_obj);
        }
        return -1;
    }
    if (rx_read_header_impl(self, (Py_ssize_t)addr, length, total, tag) < 0)
        return -1;
    count(&self->ring, CNT_MESSAGES, 1); /* a message is counted when its header is read */
    count(&self->ring, CNT_BYTES, *total);
    return 0;
}

/* The first-span header of the span just peeked, as poll_header() returns it. */
static PyObject *rx_header_tuple(RxRing *self, uint64_t addr, uint32_t length)
{
    uint64_t total;
    int32_t tag;
    if (rx_header(self, addr, length, &total, &tag) < 0)
        return NULL;
    return Py_BuildValue("(KIKi)", (unsigned long long)addr, (unsigned int)length,
                         (unsigned long long)total, (int)tag);
}

static PyObject *rx_poll_header(RxRing *self, PyObject *Py_UNUSED(ignored))
{
    uint64_t addr;
    uint32_t length;
    int found = rx_poll_impl(self, &addr, &length);
    if (found <= 0)
        return found < 0 ? NULL : Py_NewRef(Py_None);
    return rx_header_tuple(self, addr, length);
}

static uint64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* rx_poll_impl() repeated for up to `spin_ns` nanoseconds: 1 with a span, 0 if none came, -1
 * with the ring broken. The GIL stays held: spins are a few tens of us. */
static int rx_spin_poll(RxRing *self, long long spin_ns, uint64_t *addr, uint32_t *length)
{
    uint64_t end = 0;
    for (unsigned i = 0;; i++) {
        int found = rx_poll_impl(self, addr, length);
        if (found != 0)
            return found;
        if ((i & 31) == 0) {
            uint64_t now = monotonic_ns();
            if (end == 0)
                end = now + (uint64_t)(spin_ns > 0 ? spin_ns : 0);
            if (now >= end)
                return 0;
        }
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
}

/* The yield phase of a crowded wait (Endpoint.yield_us; ranks outnumber CPUs): rx_poll_impl
 * repeated with sched_yield() between polls for up to `yield_ns`, unless now < *calm (both
 * monotonic_ns): where the awaited rank shares this CPU, each yield hands the CPU to it and its
 * answer comes without a doorbell (this side never arms, so no kick), as MPICH's polling waits
 * do. A yield longer than YIELD_LONG_NS handed the CPU to another process for long: it sets
 * *calm to YIELD_CALM_NS from then, and the phase ends (Endpoint.yield_cpu's rule, same
 * values). 1/0/-1 as rx_spin_poll. */
#define YIELD_LONG_NS 200000ULL
#define YIELD_CALM_NS 50000000ULL
static int rx_yield_poll(RxRing *rx, long long yield_ns, uint64_t *calm, uint64_t *addr,
                         uint32_t *length)
{
    int found = rx_poll_impl(rx, addr, length);
    uint64_t now = found == 0 ? monotonic_ns() : 0;
    if (found != 0 || now < *calm)
        return found;
    for (uint64_t end = now + (uint64_t)yield_ns; now < end;) {
        sched_yield();
        uint64_t after = monotonic_ns();
        if ((found = rx_poll_impl(rx, addr, length)) != 0)
            return found;
        if (after - now > YIELD_LONG_NS) {
            *calm = after + YIELD_CALM_NS;
            return 0;
        }
        now = after;
    }
    return 0;
}

/* poll_header() repeated for up to `spin_ns` nanoseconds: the spin phase of a receive without
 * a trip through the interpreter per probe. */
static PyObject *rx_wait_header(RxRing *self, PyObject *spin_obj)
{
    long long spin_ns;
    if (as_long_long(spin_obj, &spin_ns) < 0)
        return NULL;
    uint64_t addr;
    uint32_t length;
    int found = rx_spin_poll(self, spin_ns, &addr, &length);
    if (found <= 0)
        return found < 0 ? NULL : Py_NewRef(Py_None);
    return rx_header_tuple(self, addr, length);
}

static bool rx_complete_impl(RxRing *self, uint16_t n);

/* Check a span of a message being taken (`left` of its bytes still to come; `expected`: the
 * region offset it must start at, a contiguous message, or -1 for any): 0, or -1 with the
 * ring broken ("span.len": it runs past the message; "span.addr": it lies elsewhere). */
static int rx_check_span(RxRing *self, uint64_t addr, uint32_t length, uint64_t left,
                         long long expected)
{
    Ring *r = &self->ring;
    if (length > left) {
        ring_corrupt(r, PyUnicode_FromString("span.len"), PyLong_FromUnsignedLong(length),
                     PyUnicode_FromFormat("%llu bytes left", (unsigned long long)left));
        return -1;
    }
    if (expected >= 0 && addr != (uint64_t)expected) {
        ring_corrupt(r, PyUnicode_FromString("span.addr"), PyLong_FromUnsignedLongLong(addr),
                     PyUnicode_FromFormat("expected contiguous %lld", expected));
        return -1;
    }
    return 0;
}

/* layout.is_contiguous: whether a message of `total` bytes is one reservation, its spans laid
 * end to end. */
static bool rx_contiguous(RxRing *self, uint64_t total)
{
    Ring *r = &self->ring;
    uint64_t bytes = SPAN_HEADER_SIZE + total;
    return bytes <= (uint64_t)r->data_size &&
           (bytes + (uint64_t)r->max_span - 1) / (uint64_t)r->max_span <= (uint64_t)(r->num / 2);
}

/* Whether every span of the message whose first span (polled: at region `addr`, `length`
 * bytes) heads it is published: 1 yes, 0 not yet, -1 with the ring broken (a span that
 * rx_check_span rejects, or the ring's own errors). Polls the spans to look, then puts them
 * back: nothing is consumed. */
static int rx_rest_ready(RxRing *self, uint64_t addr, uint32_t length, uint64_t total)
{
    uint16_t saved = self->next_avail;
    uint64_t left = total - (length - SPAN_HEADER_SIZE);
    long long expected = rx_contiguous(self, total) ? (long long)(addr + length) : -1;
    int status = 1;
    while (left > 0) {
        uint32_t span;
        if ((status = rx_poll_impl(self, &addr, &span)) <= 0)
            break;
        if (rx_check_span(self, addr, span, left, expected) < 0) {
            status = -1;
            break;
        }
        left -= span;
        if (expected >= 0)
            expected = (long long)(addr + span);
    }
    self->next_avail = saved;
    return status;
}

/* Copy the whole message headed by the span just polled (region `addr`, `length` bytes;
 * `total` bytes in all, every span published: rx_rest_ready) into `dest` (which holds it) and
 * complete its spans (the caller holds no other). Returns whether the driver must be kicked
 * (0 or 1), -1 with the ring broken. */
static int rx_take_whole(RxRing *self, uint64_t addr, uint32_t length, uint64_t total,
                         unsigned char *dest)
{
    uint64_t copied = length - SPAN_HEADER_SIZE;
    long long expected = rx_contiguous(self, total) ? (long long)(addr + length) : -1;
    copy_bytes(dest, self->ring.base + addr + SPAN_HEADER_SIZE, (Py_ssize_t)copied);
    uint16_t spans = 1;
    while (copied < total) {
        uint32_t span;
        int found = rx_poll_impl(self, &addr, &span);
        if (found == 0) /* (rx_rest_ready saw it: the driver took a published span back) */
            ring_corrupt(&self->ring, PyUnicode_FromString("avail.idx"), PyLong_FromLong(0),
                         PyUnicode_FromString("a published span went away"));
        if (found <= 0 || rx_check_span(self, addr, span, total - copied, expected) < 0)
            return -1;
        copy_bytes(dest + copied, self->ring.base + addr, (Py_ssize_t)span);
        copied += span;
        spans++;
        if (expected >= 0)
            expected = (long long)(addr + span);
    }
    return rx_complete_impl(self, spans);
}

/* The receive of a small message in one call: wait_header(spin_ns) and, when the message that
 * came is one span that fits `dest` and carries `want_tag` (any if negative), its copy into
 * `dest` and its completion. Returns None when no message came, else one shape,
 * (nbytes, tag, kick, head): head None when taken (the caller then holds no span); when not
 * taken, head is the header as poll_header() gives it (the caller keeps it as the peeked
 * head, holding its span) and kick is False. BufferError (nothing taken) if `dest` is not a
 * writable contiguous buffer. */
/* rx_spin_poll() and the header of the span it peeked: 1 with *addr, *length (the span),
 * *total and *tag (its message) set, 0 if no span came within `spin_ns`, -1 with the ring
 * broken. The span stays held (peeked). */
static int rx_spin_header(RxRing *self, long long spin_ns, uint64_t *addr, uint32_t *length,
                          uint64_t *total, int32_t *tag)
{
    int found = rx_spin_poll(self, spin_ns, addr, length);
    if (found <= 0)
        return found;
    return rx_header(self, *addr, *length, total, tag) < 0 ? -1 : 1;
}

/* Take the message whose one span (region `addr`, `total` bytes after its header) is the
 * only one held: copy its bytes into `dest` and complete the span. Returns whether the
 * driver must be kicked. */
static bool rx_take_one(RxRing *self, uint64_t addr, uint64_t total, void *dest)
{
    copy_bytes(dest, self->ring.base + addr + SPAN_HEADER_SIZE, (Py_ssize_t)total);
    return rx_complete_impl(self, 1);
}

/* The receive of a small message in one call: wait_header(spin_ns) and, when the message that
 * came is one span that fits `dest` and carries `want_tag` (any if negative), its copy into
 * `dest` and its completion. Returns None when no message came, else one shape,
 * (nbytes, tag, kick, head): head None when taken (the caller then holds no span); when not
 * taken, head is the header as poll_header() gives it (the caller keeps it as the peeked
 * head, holding its span) and kick is False. BufferError (nothing taken) if `dest` is not a
 * writable contiguous buffer. */
static PyObject *rx_recv_small_into(RxRing *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long want_tag, spin_ns;
    Py_buffer dest;
    if (check_nargs("recv_small_into", nargs, 3) < 0 || as_long_long(args[1], &want_tag) ||
        as_long_long(args[2], &spin_ns)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "recv_small_into: arguments out of range");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &dest, PyBUF_WRITABLE) < 0)
        return NULL;
    uint64_t addr, total;
    uint32_t length;
    int32_t tag;
    PyObject *result = NULL;
    int found = rx_spin_header(self, spin_ns, &addr, &length, &total, &tag);
    if (found == 0)
        result = Py_NewRef(Py_None);
    else if (found > 0) {
        if (length - SPAN_HEADER_SIZE == total && total <= (uint64_t)dest.len &&
            (want_tag < 0 || tag == want_tag)) {
            bool kick = rx_take_one(self, addr, total, dest.buf);
            result = Py_BuildValue("(KiOO)", (unsigned long long)total, (int)tag,
                                   kick ? Py_True : Py_False, Py_None);
        } else {
            result = Py_BuildValue("(KiO(KIKi))", (unsigned long long)total, (int)tag, Py_False,
                                   (unsigned long long)addr, (unsigned int)length,
                                   (unsigned long long)total, (int)tag);
        }
    }
    PyBuffer_Release(&dest);
    return result;
}

/* ------------------------------------------------------------------------------------------
 * take_posted: a run of small messages taken straight into receives posted by the layer above
 * (the MPI face's matching), without a trip through the interpreter per message.
 * ------------------------------------------------------------------------------------------ */
enum {
    P_CTX, P_SRC, P_WANT_TAG, P_VIEW, P_SINK, P_MPI, P_SOURCE, P_TAG, P_COUNT, P_OBJ, P_DONE, P_N
};
static const char *const posted_text[P_N] = {"ctx",  "src",    "want_tag", "view",
                                             "sink", "mpi",    "source",   "tag",
                                             "count", "obj",   "done"};
static PyObject *posted_name[P_N]; /* interned on first use */

struct posted_entry {
    long long ctx, src, want_tag;
    int form; /* what take_posted may fill (POSTED_*, _p2preq.h): its view, its obj, nothing */
};

/* An integer attribute of a posted entry: 0, or -1 with an exception. */
static int posted_long(PyObject *entry, int name, long long *out)
{
    PyObject *value = PyObject_GetAttr(entry, posted_name[name]);
    if (value == NULL)
        return -1;
    *out = PyLong_AsLongLong(value);
    Py_DECREF(value);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* Whether attribute `name` of `entry` is None: 1 or 0, -1 with an exception. */
static int posted_none(PyObject *entry, int name)
{
    PyObject *value = PyObject_GetAttr(entry, posted_name[name]);
    if (value == NULL)
        return -1;
    int none = value == Py_None;
    Py_DECREF(value);
    return none;
}

/* Read the fields take_posted matches on of entry `entry` into *e: 0, or -1 with an
 * exception. */
static int posted_read(PyObject *entry, struct posted_entry *e)
{
    int slots = p2preq_recv_fields(entry, &e->ctx, &e->src, &e->want_tag, &e->form);
    if (slots != 0) /* the MPI face's RecvOp, read at its slots */
        return slots < 0 ? -1 : 0;
    int sink, mpi, view;
    if (posted_long(entry, P_CTX, &e->ctx) < 0 || posted_long(entry, P_SRC, &e->src) < 0 ||
        posted_long(entry, P_WANT_TAG, &e->want_tag) < 0 ||
        (sink = posted_none(entry, P_SINK)) < 0 || (mpi = posted_none(entry, P_MPI)) < 0 ||
        (view = posted_none(entry, P_VIEW)) < 0)
        return -1;
    e->form = !(sink && mpi) ? POSTED_OTHER : view ? POSTED_OBJECT : POSTED_VIEW;
    return 0;
}

/* Fill the receive `entry` with the message of `total` bytes headed by the span just polled
 * (region `addr`, `length` bytes) if its view takes it whole and, for a message of several
 * spans, all of them are published (rx_rest_ready), completing its spans: 1 (copied; *kick
 * set if the driver must be kicked), 0 (not so: nothing done, the head span still held; a
 * view that is not a writable flat buffer is the layer above's to explain), -1 with the ring
 * broken. */
static int posted_fill(RxRing *self, PyObject *entry, uint64_t addr, uint32_t length,
                       uint64_t total, bool *kick)
{
    PyObject *view = p2preq_recv_view(entry);
    Py_buffer dest;
    int status = view == NULL ? -1 : PyObject_GetBuffer(view, &dest, PyBUF_WRITABLE);
    Py_XDECREF(view);
    if (status < 0) {
        PyErr_Clear();
        return 0;
    }
    int filled = total <= (uint64_t)dest.len;
    if (filled && length - SPAN_HEADER_SIZE != total)
        filled = rx_rest_ready(self, addr, length, total);
    if (filled > 0) {
        int kicked = rx_take_whole(self, addr, length, total, dest.buf);
        if (kicked < 0)
            filled = -1;
        else
            *kick = kicked || *kick;
    }
    PyBuffer_Release(&dest);
    return filled;
}

/* Take the message of `total` bytes headed by the span just polled (region `addr`, `length`
 * bytes) as a new bytes object, for an object entry, once every span of it is published
 * (rx_rest_ready), completing its spans: 1 with *data set (*kick set if the driver must be
 * kicked), 0 (not yet, or no memory for it: nothing done, the head span still held, the layer
 * above's to take or explain), -1 with the ring broken. */
static int posted_take_bytes(RxRing *self, uint64_t addr, uint32_t length, uint64_t total,
                             bool *kick, PyObject **data)
{
    int ready = length - SPAN_HEADER_SIZE == total ? 1 : rx_rest_ready(self, addr, length, total);
    if (ready <= 0)
        return ready;
    if (total > (uint64_t)PY_SSIZE_T_MAX ||
        (*data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total)) == NULL) {
        PyErr_Clear();
        return 0;
    }
    int kicked = rx_take_whole(self, addr, length, total, (unsigned char *)PyBytes_AS_STRING(*data));
    if (kicked < 0) {
        Py_CLEAR(*data);
        return -1;
    }
    *kick = kicked || *kick;
    return 1;
}

/* Set the completion fields of a filled entry (`obj`: its obj too, unless NULL): 0, or -1
 * with an exception. */
static int posted_done(PyObject *entry, long long source, long long tag, uint64_t total,
                       PyObject *obj)
{
    PyObject *values[3] = {PyLong_FromLongLong(source), PyLong_FromLongLong(tag),
                           PyLong_FromUnsignedLongLong(total)};
    int status = values[0] && values[1] && values[2] ? 0 : -1;
    if (status == 0 && p2preq_recv_done(entry, values, obj)) /* the MPI face's RecvOp */
        status = 1;
    for (int i = 0; i < 3 && status == 0; i++)
        status = PyObject_SetAttr(entry, posted_name[P_SOURCE + i], values[i]);
    if (status == 0 && obj != NULL)
        status = PyObject_SetAttr(entry, posted_name[P_OBJ], obj);
    for (int i = 0; i < 3; i++)
        Py_XDECREF(values[i]);
    if (status == 0)
        status = PyObject_SetAttr(entry, posted_name[P_DONE], Py_True);
    return status < 0 ? -1 : 0;
}

/* take_posted(posted, source, tag_bits) -> (taken, kick, head)
 *
 * Takes, in queue order, the messages at the head of this queue that are all published (every
 * span) into the receives of `posted` (a list, in post order) they match, and stops at the
 * first message that cannot be taken so (none there yet; none of `posted` matches; the first
 * match is neither plain nor an object entry, or its view is too small; a message of several
 * spans not all out yet). A message of core tag t matches the first entry e with e.ctx == t >>
 * tag_bits, e.src < 0 (any) or == `source`, and e.want_tag < 0 (any) or == t &
 * (2**tag_bits - 1) (its tag). A plain entry (sink and mpi None, view a writable buffer) gets
 * the bytes in its view, an object entry (sink, mpi and view None) a new bytes object of them
 * as its obj; either then gets source = `source`, tag = the message's tag, count = its length,
 * done = True, and leaves `posted`. Returns the number
 * taken, whether the sender must be kicked (the spans given back), and the header of the
 * message it stopped at, as poll_header() gives it (the caller then keeps it as the peeked
 * head, holding its span), or None. Entries are read as the matching reaches them; one
 * lacking a field stops the run there (the caller's own matching then meets it). TypeError or
 * ValueError for bad arguments (nothing taken); the ring's errors. */
static PyObject *rx_take_posted(RxRing *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long source, tag_bits;
    if (check_nargs("take_posted", nargs, 3) < 0)
        return NULL;
    PyObject *posted = args[0];
    if (!PyList_Check(posted)) {
        PyErr_SetString(PyExc_TypeError, "take_posted: posted must be a list");
        return NULL;
    }
    if (as_long_long(args[1], &source) || as_long_long(args[2], &tag_bits) || tag_bits < 0 ||
        tag_bits > 31) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "take_posted: arguments out of range");
        return NULL;
    }
    if (posted_name[0] == NULL)
        for (int i = 0; i < P_N; i++)
            if ((posted_name[i] = PyUnicode_InternFromString(posted_text[i])) == NULL)
                return NULL;
    Py_ssize_t n = PyList_GET_SIZE(posted), read = 0; /* entries[0:read] read so far */
    struct posted_entry *entries = PyMem_Malloc((size_t)(n ? n : 1) * sizeof *entries);
    if (entries == NULL)
        return PyErr_NoMemory();
    long long taken = 0;
    bool kick = false;
    PyObject *head = NULL;
    uint32_t tag_mask = (uint32_t)((1ull << tag_bits) - 1);
    while (n > 0) {
        uint64_t addr, total;
        uint32_t length;
        int32_t coretag;
        int found = rx_poll_impl(self, &addr, &length);
        if (found == 0)
            break;
        if (found < 0 || rx_header(self, addr, length, &total, &coretag) < 0)
            goto error;
        long long key = (long long)((uint32_t)coretag >> tag_bits);
        long long tag = (long long)((uint32_t)coretag & tag_mask);
        Py_ssize_t i = 0;
        bool unread = false; /* an entry lacks a field: stop here, the layer above meets it */
        for (; i < n; i++) {
            if (i == read) {
                if (posted_read(PyList_GET_ITEM(posted, i), &entries[i]) < 0) {
                    PyErr_Clear();
                    unread = true;
                    break;
                }
                read++;
            }
            struct posted_entry *e = &entries[i];
            if (e->ctx == key && (e->src < 0 || e->src == source) &&
                (e->want_tag < 0 || e->want_tag == tag))
                break;
        }
        int filled = 0;
        if (!unread && i < n && entries[i].form != POSTED_OTHER) {
            PyObject *entry = PyList_GET_ITEM(posted, i), *data = NULL;
            filled = entries[i].form == POSTED_VIEW
                         ? posted_fill(self, entry, addr, length, total, &kick)
                         : posted_take_bytes(self, addr, length, total, &kick, &data);
            if (filled < 0)
                goto error;
            if (filled) {
                taken++;
                Py_INCREF(entry);
                int status = PyList_SetSlice(posted, i, i + 1, NULL);
                if (status == 0)
                    status = posted_done(entry, source, tag, total, data);
                Py_DECREF(entry);
                Py_XDECREF(data);
                if (status < 0)
                    goto error;
                memmove(&entries[i], &entries[i + 1], (size_t)(read - i - 1) * sizeof *entries);
                n--;
                read--;
            }
        }
        if (!filled) {
            head = Py_BuildValue("(KIKi)", (unsigned long long)addr, (unsigned int)length,
                                 (unsigned long long)total, (int)coretag);
            if (head == NULL)
                goto error;
            break;
        }
    }
    PyMem_Free(entries);
    return Py_BuildValue("(LON)", taken, kick ? Py_True : Py_False, head ? head : Py_NewRef(Py_None));
error:
    PyMem_Free(entries);
    return NULL;
}

/* Give the oldest n held spans (the caller checked there are that many) back to the driver.
 * Returns whether the driver must be kicked. */
static bool rx_complete_impl(RxRing *self, uint16_t n)
{
    Ring *r = &self->ring;
    uint16_t old_idx = self->last_used;
    for (uint16_t i = 0; i < n; i++) {
        uint32_t slot = (uint16_t)(old_idx + i) & r->mask;
        r->used_ring[slot].id = slot; /* published by [R2] below */
        r->used_ring[slot].len = 0;
    }
    uint16_t new_idx = self->last_used = (uint16_t)(old_idx + n);
    /* [R2] release: after the used elements; pairs with [A2] */
    __atomic_store_n(r->used_idx, new_idx, __ATOMIC_RELEASE);
    full_fence_impl(); /* [F2] our used.idx store before the used_event load below */
    /* after [F2]; pairs with the driver's used_event store in arm() */
    uint16_t used_event = __atomic_load_n(r->used_event, __ATOMIC_ACQUIRE);
    bool kick = need_event(used_event, new_idx, old_idx);
    if (kick)
        count(r, CNT_KICKS, 1);
    return kick;
}

static PyObject *rx_complete(RxRing *self, PyObject *count_obj)
{
    long long n;
    int status = as_long_long(count_obj, &n);
    if (status < 0)
        return NULL;
    uint16_t held = rx_held(self);
    if (status || n <= 0 || n > held) {
        PyErr_Format(PyExc_ValueError, "cannot complete %S of %u held spans", count_obj,
                     (unsigned)held);
        return NULL;
    }
    return PyBool_FromLong(rx_complete_impl(self, (uint16_t)n));
}

static PyObject *rx_read_into(RxRing *self, PyObject *const *args, Py_ssize_t nargs)
{
    Ring *r = &self->ring;
    long long src, dest_offset, length;
    int src_status, dest_status, length_status;
    Py_buffer dest;
    if (check_nargs("read_into", nargs, 4) < 0 ||
        (src_status = as_long_long(args[0], &src)) < 0 ||
        (dest_status = as_long_long(args[2], &dest_offset)) < 0 ||
        (length_status = as_long_long(args[3], &length)) < 0)
        return NULL;
    if (src_status || length_status || length < 0 || src < r->data_offset ||
        src > r->data_end || length > r->data_end - src) {
        PyErr_Format(PyExc_ValueError, "%S bytes at %S lie outside the data area", args[3],
                     args[0]);
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &dest, PyBUF_SIMPLE) < 0)
        return NULL;
    if (dest.readonly) {
        PyErr_SetString(PyExc_TypeError, "cannot modify read-only memory");
        PyBuffer_Release(&dest);
        return NULL;
    }
    if (dest_status || dest_offset < 0 || dest_offset > dest.len ||
        length > dest.len - dest_offset) {
        PyErr_Format(PyExc_ValueError, "%S bytes at %S do not fit a %zd-byte buffer", args[3],
                     args[2], dest.len);
        PyBuffer_Release(&dest);
        return NULL;
    }
    copy_bytes((unsigned char *)dest.buf + dest_offset, r->base + src, (Py_ssize_t)length);
    PyBuffer_Release(&dest);
    Py_RETURN_NONE;
}

/* The rest of a message being taken, copied into dest[copied:] span by span, each span completed
 * as soon as it is copied (the caller holds no span), with stores that bypass the caches if
 * `bypass_cache` is true. Stops when `total` bytes are in, when a
 * completion must be kicked, or when no span came for `spin_ns`; returns (copied, expected,
 * kick) for the caller to kick and/or wait and call again. `expected` is the region offset the
 * next span must start at (a contiguous message), or -1 for any. Breaks the ring on a span that
 * runs past the message ("span.len") or lies elsewhere than expected ("span.addr"). */
static PyObject *rx_stream_into(RxRing *self, PyObject *const *args, Py_ssize_t nargs)
{
    Ring *r = &self->ring;
    long long copied, total, expected, spin_ns;
    Py_buffer dest;
    if (check_nargs("stream_into", nargs, 6) < 0 || as_long_long(args[1], &copied) ||
        as_long_long(args[2], &total) || as_long_long(args[3], &expected) ||
        as_long_long(args[4], &spin_ns)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "stream_into: arguments out of range");
        return NULL;
    }
    int bypass_cache = PyObject_IsTrue(args[5]);
    if (bypass_cache < 0)
        return NULL;
    if (PyObject_GetBuffer(args[0], &dest, PyBUF_WRITABLE) < 0)
        return NULL;
    if (copied < 0 || total < copied || total > dest.len) {
        PyErr_Format(PyExc_ValueError, "%lld of %lld bytes do not fit a %zd-byte buffer", copied,
                     total, dest.len);
        PyBuffer_Release(&dest);
        return NULL;
    }
    bool kick = false;
    uint64_t idle_since = 0;
    for (unsigned i = 0; copied < total && !kick; i++) {
        uint64_t addr;
        uint32_t length;
        int found = rx_poll_impl(self, &addr, &length);
        if (found < 0)
            goto fail;
        if (found == 0) {
            if ((i & 31) == 0) {
                uint64_t now = monotonic_ns();
                if (idle_since == 0)
                    idle_since = now;
                else if (now - idle_since >= (uint64_t)(spin_ns > 0 ? spin_ns : 0))
                    break;
            }
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            continue;
        }
        idle_since = 0;
        if (rx_check_span(self, addr, length, (uint64_t)(total - copied), expected) < 0)
            goto fail;
        if (bypass_cache)
            copy_bytes_streaming((unsigned char *)dest.buf + copied, r->base + addr,
                                 (Py_ssize_t)length);
        else
            copy_bytes((unsigned char *)dest.buf + copied, r->base + addr, (Py_ssize_t)length);
        copied += length;
        if (expected >= 0)
            expected = (long long)(addr + length);
        kick = rx_complete_impl(self, 1);
    }
    PyBuffer_Release(&dest);
    return Py_BuildValue("(LLO)", copied, expected, kick ? Py_True : Py_False);
fail:
    PyBuffer_Release(&dest);
    return NULL;
}

static PyObject *rx_arm(RxRing *self, PyObject *Py_UNUSED(ignored))
{
    Ring *r = &self->ring;
    /* avail_event store: pairs with the driver's load after its [F1] */
    __atomic_store_n(r->avail_event, self->next_avail, __ATOMIC_RELEASE);
    full_fence_impl(); /* [F1] our avail_event store before the avail.idx load below */
    if (!r->synced)
        return PyBool_FromLong(ring_sync(r));
    uint16_t avail_idx = __atomic_load_n(r->avail_idx, __ATOMIC_ACQUIRE); /* [A1]; [R1] */
    return PyBool_FromLong(avail_idx != self->avail_seen ||
                           self->next_avail != self->avail_seen);
}

static PyObject *rx_get_held(RxRing *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(rx_held(self));
}

static PyMethodDef rx_methods[] = {
    {"mark_broken", (PyCFunction)(void (*)(void))ring_mark_broken, METH_FASTCALL,
     "mark_broken(field, value, detail): break the ring for good; return the error."},
    {"reset", (PyCFunction)rx_reset, METH_O,
     "Drop everything unread and start session `session` (owner: this device)."},
    {"check_sync", (PyCFunction)ring_check_sync, METH_NOARGS,
     "True once the driver half holds our session."},
    {"poll", (PyCFunction)rx_poll, METH_NOARGS,
     "Peek the next published span: (region offset, length), or None."},
    {"read_header", (PyCFunction)(void (*)(void))rx_read_header, METH_FASTCALL,
     "read_header(offset, length): decode a first-span header: (total, tag)."},
    {"poll_header", (PyCFunction)rx_poll_header, METH_NOARGS,
     "poll() and read_header() fused: (offset, length, total, tag), or None."},
    {"wait_header", (PyCFunction)rx_wait_header, METH_O,
     "wait_header(spin_ns): poll_header() repeated for up to spin_ns nanoseconds."},
    {"complete", (PyCFunction)rx_complete, METH_O,
     "Give the oldest `count` held spans back to the driver. True iff it must be kicked."},
    {"recv_small_into", (PyCFunction)(void (*)(void))rx_recv_small_into, METH_FASTCALL,
     "recv_small_into(dest, want_tag, spin_ns) -> (nbytes, tag, kick, head) | None"},
    {"take_posted", (PyCFunction)(void (*)(void))rx_take_posted, METH_FASTCALL,
     "take_posted(posted, source, tag_bits) -> (taken, kick, head)"},
    {"stream_into", (PyCFunction)(void (*)(void))rx_stream_into, METH_FASTCALL,
     "stream_into(dest, copied, total, expected, spin_ns, bypass_cache) -> (copied, expected, "
     "kick)"},
    {"read_into", (PyCFunction)(void (*)(void))rx_read_into, METH_FASTCALL,
     "read_into(src_offset, dest_buffer, dest_offset, length): copy out of the data area."},
    {"count_message", (PyCFunction)ring_count_message, METH_O,
     "Add one message of `nbytes` to the device line's counters."},
    {"count_sleep", (PyCFunction)ring_count_wait, METH_NOARGS, "Count one blocked wait."},
    {"arm", (PyCFunction)rx_arm, METH_NOARGS,
     "Ask to be kicked at the next publication; True if one already arrived."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef rx_getset[] = {
    {"broken", (getter)ring_get_broken, NULL, "the error that broke this ring, or None", NULL},
    {"held", (getter)rx_get_held, NULL, "spans peeked and not yet completed", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RxRingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ivshmem_comm._fastpath.RxRing",
    .tp_doc = "Device half of one queue: peeks published spans, validates them, completes "
              "them in order.\n\nRxRing(region_buf, queue_offset, geometry, peer); then "
              "reset(session).",
    .tp_basicsize = sizeof(RxRing),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)rx_init,
    .tp_dealloc = (destructor)rx_dealloc,
    .tp_traverse = (traverseproc)ring_traverse,
    .tp_clear = (inquiry)ring_clear,
    .tp_methods = rx_methods,
    .tp_members = ring_members,
    .tp_getset = rx_getset,
};

/* ------------------------------------------------------------------------------------------
 * CollectiveRound: one round of the collective area's protocol (ivshmem_comm/collective.py,
 * whose docstring defines it) for the collectives that fit one round, in one call. The same
 * words are stored and loaded in the same order as CollectiveGroup's steps, so a member on
 * this path and one on the Python steps interoperate. Labels as there: [R5]/[A5] arrive seq
 * (release store / acquire load), [F3]/[F4] the sleep-flag fences. Round k uses cell
 * k % COLL_CELLS of every member; it starts once the others published round k-1 (their
 * other cell). Every word of another member is loaded once into a local and checked:
 * generation ours, round within [t-2, t] of the round t awaited in that cell, then kind,
 * nbytes, rounds; a violation raises RingCorruptError
 * naming the member's peer and breaks this object for good. Offsets into slabs come from the
 * caller's arguments (checked against the slab size and the buffers), never from shared
 * memory.
 *
 * A call spins for at most spin_ns on each word it waits for; if that is not enough it
 * returns (rank, u64 index, round, field) and the caller blocks on its doorbell until the
 * word moves (CollectiveGroup._block), then calls resume(): the call's buffers and position
 * are kept here meanwhile. Returns 0 when the round completed, 1 when a member declined it
 * (gatherv / scatterv / alltoallv: rounds word 0), 2 when it completed at a scatterv member
 * whose block (the root's arrival says its length) is longer than recv: recv holds its first
 * bytes, the caller reports the truncation (a shorter block leaves the rest of recv as it
 * was). A scatterv root may take two
 * rounds (blocks of up to two segments, see coll_prepare): one call then runs rounds k and
 * k+1 (`round` says where it is). A declined alltoallv writes no block of
 * another member into recv (it reads every member's rounds word first, CP_ROUNDS; its own
 * block is copied once the others are published, unless it declines), so that in place (send
 * is recv) the caller still holds what it sends otherwise.
 * ------------------------------------------------------------------------------------------ */
enum {
    CW_BARRIER, CW_BCAST, CW_GATHERV, CW_SCATTERV, CW_ALLGATHERV, CW_ALLTOALLV,
    CW_BCAST_BYTES, CW_GATHER_BYTES, CW_ALLGATHER_BYTES, CW_FOLD
};
enum { CP_ENTER, CP_PUBLISH, CP_ROUNDS, CP_TAKE, CP_END };
/* Kinds: collective.KIND_*. */
enum { CK_BARRIER = 1, CK_BCAST, CK_GATHER, CK_SCATTER, CK_ALLGATHER, CK_ALLTOALL };
enum { CK_REDUCE = 7, CK_ALLREDUCE, CK_REDUCE_SCATTER, CK_SCAN, CK_EXSCAN };
enum { CK_BCAST_BYTES = 12, CK_GATHER_BYTES, CK_ALLGATHER_BYTES };
/* Element types and ops of CW_FOLD: collective.FOLD_DTYPES / FOLD_OPS. */
enum { CD_I1, CD_I2, CD_I4, CD_I8, CD_U1, CD_U2, CD_U4, CD_U8, CD_F4, CD_F8, CD_COUNT };
enum { CO_SUM, CO_PROD, CO_MAX, CO_MIN, CO_BAND, CO_BOR, CO_BXOR, CO_COUNT };

typedef struct {
    PyObject_HEAD
    Py_buffer view;    /* the region, held for the object's life */
    PyObject *kick;    /* kick(peer): ring a member's doorbell */
    PyObject *broken;  /* the RingCorruptError that broke the group, or NULL */
    int size, rank;
    long long slot;
    uint64_t gen;
    Py_ssize_t slab_size, seg;
    Py_ssize_t sseg; /* a scatterv's and an alltoallv's segment: a slab cut for the others only */
    long long *peers;               /* peer id of each member */
    uint64_t **arrive, **sleep;     /* arrive[r * COLL_CELLS + cell], sleep[r] */
    unsigned char **slab;           /* slab[r * COLL_CELLS + cell] */
    Py_ssize_t *counts, *displs, *rcounts, *rdispls; /* the call's vectors (bytes) */
    /* the call in progress (active) */
    bool active, declined;
    int which, phase, pos, root, kind, dtype, op, upto;
    bool want;
    uint64_t k, rounds_out, rounds_seen;
    /* a scatterv of several rounds (its blocks over a segment, the root's choice): which
     * round of it this is (0 ..: the piece of every block it moves), and how many (the
     * root's rounds word; 0 until a member has read it) */
    uint64_t sround, srounds;
    /* a scatterv member's block (bytes, from the root's first arrival) and
     * whether it is longer than recv (only recv's length of it is copied; run/front/resume
     * then return 2) */
    Py_ssize_t sblock;
    bool truncated;
    Py_ssize_t nbytes; /* fold: bytes of each operand (a reduce-scatter: seg * size) */
    bool scatter;      /* fold: a reduce-scatter (counts: each member's block, bytes) */
    Py_ssize_t part;   /* fold: bytes of the result (a reduce-scatter: counts[rank]) */
    Py_buffer send, recv;
    bool has_send, has_recv;
    PyObject *taken; /* the *_BYTES calls: a list, per member its bytes or None */
    bool pieces;     /* a *_BYTES call taking from each slab this member's piece of a bundle */
} CollRound;

static void coll_release_call(CollRound *c)
{
    if (c->has_send)
        PyBuffer_Release(&c->send);
    if (c->has_recv)
        PyBuffer_Release(&c->recv);
    c->has_send = c->has_recv = false;
    c->active = false;
}

static PyObject *coll_corrupt_as(PyObject *type, CollRound *c, int r, const char *field,
                                 PyObject *value, PyObject *detail)
{
    /* The field as CollectiveGroup._corrupt names it: "collective slot S FIELD". */
    PyObject *name = PyUnicode_FromFormat("collective slot %lld %s", c->slot, field);
    if (name != NULL && value != NULL && detail != NULL) {
        PyObject *err = PyObject_CallFunction(type, "LOOO", c->peers[r], name, value, detail);
        if (err != NULL) {
            Py_XSETREF(c->broken, err);
            PyErr_SetObject((PyObject *)Py_TYPE(err), err);
        }
    }
    Py_XDECREF(name);
    Py_XDECREF(value);
    Py_XDECREF(detail);
    coll_release_call(c);
    return NULL;
}

static PyObject *coll_corrupt(CollRound *c, int r, const char *field, PyObject *value,
                              PyObject *detail)
{
    return coll_corrupt_as(RingCorruptError, c, r, field, value, detail);
}

/* Member r's seq word of the cell it publishes round `target` in, loaded once [A5] and
 * checked (window target-2 .. target); -1 with the error set. */
static int coll_seq(CollRound *c, int r, uint64_t *word_p, uint64_t target, const char *field,
                    uint64_t *out)
{
    uint64_t word = __atomic_load_n(word_p, __ATOMIC_ACQUIRE);
    if (word >> COLL_SEQ_BITS != c->gen) {
        coll_corrupt(c, r, field, PyLong_FromUnsignedLongLong(word),
                     PyUnicode_FromFormat("generation is not %llu",
                                          (unsigned long long)c->gen));
        return -1;
    }
    uint64_t value = word & COLL_SEQ_MASK;
    if (value + 2 < target || value > target) {
        coll_corrupt(c, r, field, PyLong_FromUnsignedLongLong(value),
                     PyUnicode_FromFormat("round out of the window %lld..%lld",
                                          (long long)target - 2, (long long)target));
        return -1;
    }
    *out = value;
    return 0;
}

/* Spin up to spin_ns until member r's word reaches `target`: 1 reached, 0 not yet, -1 error.
 * `yield` (crowded): sched_yield() between loads, so that a member sharing this CPU runs.
 * No "calm" rule here (rx_yield_poll's): where ranks outnumber CPUs nearly every yield hands
 * the CPU to another rank for a while, and skipping the yields then sent every wait to the
 * doorbell (4 ranks on 2 CPUs: small Bcast/Scatter/Gather 3-4x slower). */
static int coll_spin(CollRound *c, int r, uint64_t *word_p, uint64_t target, const char *field,
                     long long spin_ns, bool yield)
{
    uint64_t end = 0;
    for (unsigned i = 0;; i++) {
        uint64_t value;
        if (coll_seq(c, r, word_p, target, field, &value) < 0)
            return -1;
        if (value >= target)
            return 1;
        if ((i & 15) == 0) {
            uint64_t now = monotonic_ns();
            if (end == 0)
                end = now + (uint64_t)(spin_ns > 0 ? spin_ns : 0);
            if (now >= end)
                return 0;
        }
        if (yield)
            sched_yield();
#if defined(__x86_64__) || defined(__i386__)
        else
            __builtin_ia32_pause();
#endif
    }
}

/* Member r's arrive line of the cell of round k. */
static inline uint64_t *coll_line(CollRound *c, int r, uint64_t k)
{
    return c->arrive[r * COLL_CELLS + (int)(k % COLL_CELLS)];
}

/* After our seq store: kick every other member whose sleep flag is up [F4]. */
static int coll_wake(CollRound *c)
{
    full_fence_impl(); /* [F4] our seq store before the sleep-flag loads */
    for (int r = 0; r < c->size; r++) {
        if (r == c->rank || !__atomic_load_n(c->sleep[r], __ATOMIC_RELAXED))
            continue;
        PyObject *res = PyObject_CallFunction(c->kick, "L", c->peers[r]);
        if (res == NULL)
            return -1;
        Py_DECREF(res);
    }
    return 0;
}

/* The element-wise fold acc = acc op x over n elements of type T (numpy ufunc semantics:
 * integers wrap; float MAX/MIN propagate NaN and, between equal operands such as -0.0 and
 * 0.0, give the second, as np.maximum / np.minimum do). */
#define FOLD_INT(T, U)                                                                         \
    static void fold_##T(int op, T *acc, const T *x, Py_ssize_t n)                             \
    {                                                                                          \
        switch (op) {                                                                          \
        case CO_SUM: for (Py_ssize_t i = 0; i < n; i++) acc[i] = (T)((U)acc[i] + (U)x[i]); break; \
        case CO_PROD: for (Py_ssize_t i = 0; i < n; i++) acc[i] = (T)((U)acc[i] * (U)x[i]); break; \
        case CO_MAX: for (Py_ssize_t i = 0; i < n; i++) acc[i] = acc[i] >= x[i] ? acc[i] : x[i]; break; \
        case CO_MIN: for (Py_ssize_t i = 0; i < n; i++) acc[i] = acc[i] <= x[i] ? acc[i] : x[i]; break; \
        case CO_BAND: for (Py_ssize_t i = 0; i < n; i++) acc[i] &= x[i]; break;                \
        case CO_BOR: for (Py_ssize_t i = 0; i < n; i++) acc[i] |= x[i]; break;                 \
        default: for (Py_ssize_t i = 0; i < n; i++) acc[i] ^= x[i]; break;                     \
        }                                                                                      \
    }
#define FOLD_FLOAT(T)                                                                          \
    static void fold_##T(int op, T *acc, const T *x, Py_ssize_t n)                             \
    {                                                                                          \
        switch (op) {                                                                          \
        case CO_SUM: for (Py_ssize_t i = 0; i < n; i++) acc[i] = acc[i] + x[i]; break;        \
        case CO_PROD: for (Py_ssize_t i = 0; i < n; i++) acc[i] = acc[i] * x[i]; break;       \
        case CO_MAX:                                                                           \
            for (Py_ssize_t i = 0; i < n; i++)                                                 \
                acc[i] = (acc[i] > x[i] || acc[i] != acc[i]) ? acc[i] : x[i];                  \
            break;                                                                             \
        default:                                                                               \
            for (Py_ssize_t i = 0; i < n; i++)                                                 \
                acc[i] = (acc[i] < x[i] || acc[i] != acc[i]) ? acc[i] : x[i];                  \
            break;                                                                             \
        }                                                                                      \
    }
FOLD_INT(int8_t, uint8_t)
FOLD_INT(int16_t, uint16_t)
FOLD_INT(int32_t, uint32_t)
FOLD_INT(int64_t, uint64_t)
FOLD_INT(uint8_t, uint8_t)
FOLD_INT(uint16_t, uint16_t)
FOLD_INT(uint32_t, uint32_t)
FOLD_INT(uint64_t, uint64_t)
FOLD_FLOAT(float)
FOLD_FLOAT(double)

static const Py_ssize_t fold_itemsize[CD_COUNT] = {1, 2, 4, 8, 1, 2, 4, 8, 4, 8};

/* acc op= x; the operands are unaligned-safe only for aligned buffers: the slabs are
 * page-aligned and the receive buffer is checked aligned to its element by the caller. */
static void fold_into(int dtype, int op, void *acc, const void *x, Py_ssize_t n)
{
    switch (dtype) {
    case CD_I1: fold_int8_t(op, acc, x, n); break;
    case CD_I2: fold_int16_t(op, acc, x, n); break;
    case CD_I4: fold_int32_t(op, acc, x, n); break;
    case CD_I8: fold_int64_t(op, acc, x, n); break;
    case CD_U1: fold_uint8_t(op, acc, x, n); break;
    case CD_U2: fold_uint16_t(op, acc, x, n); break;
    case CD_U4: fold_uint32_t(op, acc, x, n); break;
    case CD_U8: fold_uint64_t(op, acc, x, n); break;
    case CD_F4: fold_float(op, acc, x, n); break;
    default: fold_double(op, acc, x, n); break;
    }
}

/* The members whose arrival this call takes, in order: the pos-th one, or -1 past the end. */
static int coll_taken(CollRound *c, int pos)
{
    int me = c->rank;
    switch (c->which) {
    case CW_BCAST:
    case CW_SCATTERV:
        return (me == c->root || pos > 0) ? -1 : c->root;
    case CW_GATHERV: /* a member sends: takes nothing (never waits for the root); the root
                      * takes every other member's arrival, its block's too where that goes
                      * by messages (over a slab: the arrival says so, see coll_consume) */
        if (me != c->root)
            return -1;
        break;
    case CW_BCAST_BYTES:
        return (me == c->root || pos > 0) ? -1 : c->root;
    case CW_GATHER_BYTES:
        if (me != c->root)
            return -1;
        break;
    case CW_FOLD: /* ranks 0 .. upto-1 in order, this one included (its slab) */
        return (c->want && pos < c->upto) ? pos : -1;
    default:
        break;
    }
    /* every other member, in rank order */
    int r = pos < me ? pos : pos + 1;
    return r < c->size ? r : -1;
}

/* What member r's arrival must announce: kind and nbytes. */
static void coll_expect(CollRound *c, int r, uint64_t *kind, uint64_t *nbytes)
{
    static const uint64_t kinds[] = {CK_BARRIER,     CK_BCAST,        CK_GATHER,
                                     CK_SCATTER,     CK_ALLGATHER,    CK_ALLTOALL,
                                     CK_BCAST_BYTES, CK_GATHER_BYTES, CK_ALLGATHER_BYTES};
    *kind = c->which == CW_FOLD ? (uint64_t)c->kind : kinds[c->which];
    switch (c->which) {
    case CW_BCAST: *nbytes = (uint64_t)c->recv.len; break;
    case CW_GATHERV: *nbytes = c->rank == c->root ? (uint64_t)c->counts[r] : 0; break;
    case CW_ALLGATHERV: *nbytes = (uint64_t)c->counts[r]; break;
    case CW_SCATTERV: *nbytes = (uint64_t)(c->sseg * (c->size - 1)); break;
    case CW_ALLTOALLV: *nbytes = (uint64_t)(c->sseg * (c->size - 1)); break;
    case CW_FOLD: *nbytes = (uint64_t)c->nbytes; break;
    default: *nbytes = 0; break;
    }
}

/* A scatterv's piece of a block of `count` bytes this round (c->sround): its length (0 past
 * the block's end) and, in *at, its offset in the block. */
static Py_ssize_t scatter_piece(CollRound *c, Py_ssize_t count, Py_ssize_t *at)
{
    Py_ssize_t start = (Py_ssize_t)c->sround * c->sseg;
    *at = start < count ? start : count;
    return count - *at < c->sseg ? count - *at : c->sseg;
}

/* The rounds a scatterv block of `count` bytes takes, a segment each (at least one). */
static uint64_t scatter_rounds(CollRound *c, Py_ssize_t count)
{
    return count > c->sseg ? (uint64_t)((count - 1) / c->sseg + 1) : 1;
}

/* Where a scatterv root's first arrival (member r = root, round k) holds the bytes of the
 * others' blocks, q at entry q - (q > root): the words after its rounds word in the arrive
 * line and its spare line (collective.SCATTER_LENGTHS of them); NULL in a larger group. */
static uint64_t *scatter_lengths(CollRound *c, int r, uint64_t k)
{
    return c->size - 1 <= COLL_SCATTER_LENGTHS ? coll_line(c, r, k) + 4 : NULL;
}

/* Step 2: this member's slab, then nbytes, kind, rounds, then the seq [R5]. */
static void coll_publish(CollRound *c)
{
    int me = c->rank;
    int cell = (int)(c->k % COLL_CELLS);
    unsigned char *slab = c->slab[me * COLL_CELLS + cell];
    const unsigned char *send = c->has_send ? c->send.buf : NULL;
    uint64_t nbytes = 0, kind = 0;
    coll_expect(c, me, &kind, &nbytes);
    switch (c->which) {
    case CW_BCAST:
        if (me != c->root)
            nbytes = 0;
        else
            copy_to_reader(slab, c->recv.buf, (Py_ssize_t)nbytes, (long long)nbytes);
        break;
    case CW_GATHERV: /* declined (over a slab): its size, and the data go by messages; the
                      * root reads the block next (copy_to_reader's stores, as a bcast's) */
        nbytes = me == c->root ? 0 : (uint64_t)c->send.len;
        if (!c->declined)
            copy_to_reader(slab, send, (Py_ssize_t)nbytes, (long long)nbytes);
        break;
    case CW_SCATTERV:
        if (me != c->root) {
            nbytes = 0;
            break;
        }
        if (!c->rounds_out) /* declined: no block moves here */
            break;
        uint64_t *lengths = c->sround == 0 ? scatter_lengths(c, me, c->k) : NULL;
        for (int q = 0; lengths != NULL && q < c->size; q++) /* (for each reader's check) */
            if (q != me)
                __atomic_store_n(lengths + q - (q > me), (uint64_t)c->counts[q], __ATOMIC_RELAXED);
        for (int q = 0; q < c->size; q++) { /* piece of block q at (q - (q > root)) * sseg */
            if (q == me)
                continue;
            unsigned char *block = slab + (q - (q > me)) * c->sseg;
            Py_ssize_t at, len = scatter_piece(c, c->counts[q], &at);
            if (len >= COLL_STREAM_MIN) /* (see there) */
                copy_bytes_streaming(block, send + c->displs[q] + at, len);
            else
                memcpy(block, send + c->displs[q] + at, (size_t)len);
        }
        break;
    case CW_ALLGATHERV: /* in place (no send): this rank's block of recv */
        copy_to_reader(slab, send != NULL ? send : (unsigned char *)c->recv.buf + c->displs[me],
                       (Py_ssize_t)nbytes, (long long)nbytes);
        break;
    case CW_ALLTOALLV:
        if (!c->rounds_out) /* declined: no block moves here */
            break;
        for (int q = 0; q < c->size; q++) {
            if (q == me)
                continue;
            /* block q at (q - (q > me)) * sseg: the slab is cut for the others only */
            unsigned char *block = slab + (q - (q > me)) * c->sseg;
            if (c->counts[q] >= COLL_STREAM_MIN) /* (see there: as a scatterv's) */
                copy_bytes_streaming(block, send + c->displs[q], c->counts[q]);
            else
                memcpy(block, send + c->displs[q], (size_t)c->counts[q]);
        }
        break;
    case CW_FOLD: /* a reduce-scatter: block q (at displs[q] of send) at q * seg. The other
                   * members read the operand next (copy_to_reader's stores, as a gather's
                   * block); this member reads its own from send (coll_fold_own) */
        if (!c->scatter)
            copy_to_reader(slab, send, (Py_ssize_t)nbytes, (long long)nbytes);
        else
            for (int q = 0; q < c->size; q++)
                copy_to_reader(slab + q * c->seg, send + c->displs[q], c->counts[q],
                               (long long)nbytes);
        break;
    case CW_BCAST_BYTES:
    case CW_GATHER_BYTES:
    case CW_ALLGATHER_BYTES: /* rounds word 1: in the slab; 0: none, or sent otherwise */
        nbytes = c->rounds_out ? (uint64_t)c->send.len : 0;
        if (nbytes)
            memcpy(slab, send, (size_t)nbytes);
        break;
    default:
        break;
    }
    uint64_t *line = c->arrive[me * COLL_CELLS + cell];
    if (c->which == CW_BCAST && me == c->root && nbytes <= COLL_BCAST_INLINE)
        memcpy(line + 4, c->recv.buf, (size_t)nbytes); /* (before the seq store [R5]) */
    __atomic_store_n(line + 1, nbytes, __ATOMIC_RELAXED);
    __atomic_store_n(line + 2, kind, __ATOMIC_RELAXED);
    __atomic_store_n(line + 3, c->rounds_out, __ATOMIC_RELAXED);
    __atomic_store_n(line, (c->gen << COLL_SEQ_BITS) | c->k, __ATOMIC_RELEASE); /* [R5] */
}

/* Member r's rounds word (after its [A5] load): 0 (declined) or 1; else corrupt (-1). */
static int coll_rounds(CollRound *c, int r)
{
    uint64_t value = __atomic_load_n(coll_line(c, r, c->k) + 3, __ATOMIC_RELAXED);
    if (value > 1) {
        coll_corrupt(c, r, "rounds", PyLong_FromUnsignedLongLong(value),
                     PyUnicode_FromString("this member needs 1..1"));
        return -1;
    }
    if (value == 0)
        c->declined = true;
    return (int)value;
}

/* A bundle's piece for this member (pickling.bundle's layout: `size` uint64 little-endian
 * end offsets counted from the end of that header, then the pieces) in member r's slab of
 * `*nbytes` bytes at `*data`: both set to the piece. Each offset is read once and checked (a
 * peer may be hostile); -1 with RingCorruptError naming r where they do not fit. */
static int coll_piece(CollRound *c, int r, const unsigned char **data, uint64_t *nbytes)
{
    int me = c->rank;
    uint64_t head = 8 * (uint64_t)c->size, start = 0, end = 0;
    if (*nbytes >= head) {
        if (me)
            memcpy(&start, *data + 8 * (me - 1), 8);
        memcpy(&end, *data + 8 * me, 8);
        start = le64toh(start);
        end = le64toh(end);
    }
    if (*nbytes < head || start > end || end > *nbytes - head) {
        coll_corrupt(c, r, "bundle", PyLong_FromUnsignedLongLong(*nbytes),
                     PyUnicode_FromFormat("piece %d of %d at %llu..%llu past its end", me, c->size,
                                          (unsigned long long)start, (unsigned long long)end));
        return -1;
    }
    *data += head + start;
    *nbytes = end - start;
    return 0;
}

/* Where a fold member reads its own operand (c->part bytes; `slab`: its copy in its own
 * slab): from send itself, in this CPU's cache, where copy_to_reader's streaming stores left
 * the slab's copy in memory only; the slab's copy where send overlaps recv, which the fold
 * overwrites from the first operand on (in place: recv is the operand), except for rank 0's
 * operand in place, which is recv itself (its copy is then skipped). */
static const unsigned char *coll_fold_own(CollRound *c, const unsigned char *slab)
{
    if (!c->has_send)
        return slab;
    const unsigned char *own = (const unsigned char *)c->send.buf;
    if (c->scatter)
        own += c->displs[c->rank];
    uintptr_t at = (uintptr_t)own, recv = (uintptr_t)c->recv.buf, n = (uintptr_t)c->part;
    bool apart = at + n <= recv || recv + n <= at;
    return apart || (at == recv && c->rank == 0) ? own : slab;
}

/* Step 3 for member r, whose arrival is published: check it, then consume its slab. */
static int coll_consume(CollRound *c, int r)
{
    int me = c->rank;
    uint64_t want_kind, want_nbytes;
    coll_expect(c, r, &want_kind, &want_nbytes);
    if (r != me) {
        uint64_t *line = coll_line(c, r, c->k);
        uint64_t nbytes = __atomic_load_n(line + 1, __ATOMIC_RELAXED); /* after [A5] */
        uint64_t kind = __atomic_load_n(line + 2, __ATOMIC_RELAXED);
        if (kind != want_kind) {
            coll_corrupt(c, r, "kind", PyLong_FromUnsignedLongLong(kind),
                         PyUnicode_FromFormat("this member runs kind %llu",
                                              (unsigned long long)want_kind));
            return -1;
        }
        if (c->which >= CW_BCAST_BYTES && c->which <= CW_ALLGATHER_BYTES) {
            if (nbytes > (uint64_t)c->slab_size) {
                coll_corrupt(c, r, "nbytes", PyLong_FromUnsignedLongLong(nbytes),
                             PyUnicode_FromFormat("more than a slab (%zd bytes)", c->slab_size));
                return -1;
            }
            want_nbytes = nbytes;
        } else if (nbytes != want_nbytes) {
            /* more than this call takes: MPI's truncation (CollectiveTruncatedError) */
            coll_corrupt_as(nbytes > want_nbytes ? CollectiveTruncatedError : RingCorruptError,
                            c, r, "nbytes", PyLong_FromUnsignedLongLong(nbytes),
                         PyUnicode_FromFormat("this call expects %llu bytes",
                                              (unsigned long long)want_nbytes));
            return -1;
        }
    }
    const unsigned char *theirs = c->slab[r * COLL_CELLS + (int)(c->k % COLL_CELLS)];
    unsigned char *recv = c->has_recv ? c->recv.buf : NULL;
    switch (c->which) {
    case CW_BCAST: /* (r is the root, not this member: its line, after [A5]) */
        if (want_nbytes <= COLL_BCAST_INLINE)
            theirs = (const unsigned char *)(coll_line(c, r, c->k) + 4);
        memcpy(recv, theirs, (size_t)want_nbytes);
        break;
    case CW_GATHERV: /* (the root: nbytes checked to be counts[r] above) a block within a
                      * slab is in it; a longer one comes by messages (its member declined
                      * itself, this root's round is declined: coll_prepare) */
        if (want_nbytes <= (uint64_t)c->slab_size)
            memcpy(recv + c->displs[r], theirs, (size_t)want_nbytes);
        break;
    case CW_SCATTERV: { /* the root's rounds word: 0 (declined), else every round's count */
        uint64_t rounds = __atomic_load_n(coll_line(c, r, c->k) + 3, __ATOMIC_RELAXED);
        uint64_t most = scatter_rounds(c, (Py_ssize_t)MAX_MESSAGE);
        if (c->sround == 0 ? rounds > most : rounds != c->srounds) {
            coll_corrupt(c, r, "rounds", PyLong_FromUnsignedLongLong(rounds),
                         c->sround == 0 ? PyUnicode_FromFormat("this member needs 1..%llu",
                                                              (unsigned long long)most)
                                       : PyUnicode_FromFormat("its first round said %llu",
                                                              (unsigned long long)c->srounds));
            return -1;
        }
        if (rounds == 0) {
            c->declined = true;
            break;
        }
        if (c->sround == 0) { /* this member's block: loaded once, within the root's rounds */
            uint64_t *lengths = scatter_lengths(c, r, c->k);
            uint64_t block = lengths == NULL ? (uint64_t)c->recv.len /* (a larger group) */
                : __atomic_load_n(lengths + me - (me > r), __ATOMIC_RELAXED); /* (after [A5]) */
            if (block > rounds * (uint64_t)c->sseg) {
                coll_corrupt(c, r, "block", PyLong_FromUnsignedLongLong(block),
                             PyUnicode_FromFormat("more than its %llu rounds of %zd bytes",
                                                  (unsigned long long)rounds, c->sseg));
                return -1;
            }
            c->sblock = (Py_ssize_t)block;
            c->truncated = c->sblock > c->recv.len;
        }
        c->srounds = rounds;
        Py_ssize_t at, len = scatter_piece(c, c->truncated ? c->recv.len : c->sblock, &at);
        memcpy(recv + at, theirs + (me - (me > c->root)) * c->sseg, (size_t)len);
        break;
    }
    case CW_ALLGATHERV:
        memcpy(recv + c->displs[r], theirs, (size_t)want_nbytes);
        break;
    case CW_ALLTOALLV: /* every rounds word read already (CP_ROUNDS); not declined: every
                        * count of this member is within a segment (sseg) */
        if (!c->declined)
            memcpy(recv + c->rdispls[r], theirs + (me - (me > r)) * c->sseg,
                   (size_t)c->rcounts[r]);
        break;
    case CW_BCAST_BYTES:
    case CW_GATHER_BYTES:
    case CW_ALLGATHER_BYTES: {
        int rounds = coll_rounds(c, r);
        if (rounds < 0)
            return -1;
        if (rounds == 0) /* r sends it otherwise; its entry stays None */
            break;
        if (c->pieces && coll_piece(c, r, &theirs, &want_nbytes) < 0)
            return -1;
        PyObject *data = PyBytes_FromStringAndSize((const char *)theirs, (Py_ssize_t)want_nbytes);
        if (data == NULL) {
            coll_release_call(c);
            return -1;
        }
        PyList_SetItem(c->taken, r, data); /* steals; replaces None */
        break;
    }
    case CW_FOLD: /* a reduce-scatter: this rank's block of r's slab, at rank * seg */
        if (c->scatter)
            theirs += me * c->seg;
        if (c->part == 0)
            break;
        if (r == me)
            theirs = coll_fold_own(c, theirs);
        if (r != 0)
            fold_into(c->dtype, c->op, recv, theirs, c->part / fold_itemsize[c->dtype]);
        else if (theirs != recv) /* (in place, rank 0's operand is recv itself) */
            memcpy(recv, theirs, (size_t)c->part);
        break;
    default:
        break;
    }
    return 0;
}

static PyObject *coll_wait_tuple(CollRound *c, int r, uint64_t *word, uint64_t target,
                                 const char *field)
{
    Py_ssize_t index = (unsigned char *)word - (unsigned char *)c->view.buf;
    return Py_BuildValue("(inns)", r, index / 8, (Py_ssize_t)target, field);
}

/* Run the call from where it stands: 0 / 1 (see above), a wait tuple, or NULL. */
static PyObject *coll_advance(CollRound *c, long long spin_ns, bool yield)
{
    int me = c->rank;
    for (;;) {
        switch (c->phase) {
        case CP_ENTER: /* step 1: every other member published round k-1 */
            for (; c->pos < c->size; c->pos++) {
                int r = c->pos;
                if (r == me)
                    continue;
                uint64_t *before = coll_line(c, r, c->k - 1);
                int got = coll_spin(c, r, before, c->k - 1, "arrive seq", spin_ns, yield);
                if (got <= 0)
                    return got < 0 ? NULL : coll_wait_tuple(c, r, before, c->k - 1,
                                                            "arrive seq");
            }
            c->phase = CP_PUBLISH;
            break;
        case CP_PUBLISH:
            coll_publish(c);
            c->phase = c->which == CW_ALLTOALLV ? CP_ROUNDS : CP_TAKE;
            c->pos = 0;
            if (coll_wake(c) < 0) {
                coll_release_call(c);
                return NULL;
            }
            /* a scatterv root's or an alltoallv member's own block, once the others' are
             * published (they need not wait for this copy; in place it stays where it is):
             * a scatterv's after its last round's, the readers' next pieces not behind it */
            if (c->which == CW_SCATTERV && me == c->root && c->rounds_out && c->has_recv &&
                c->sround + 1 == c->srounds)
                memmove(c->recv.buf, (unsigned char *)c->send.buf + c->displs[me],
                        (size_t)c->recv.len);
            if (c->which == CW_ALLTOALLV && c->rounds_out)
                memmove((unsigned char *)c->recv.buf + c->rdispls[me],
                        (unsigned char *)c->send.buf + c->displs[me], (size_t)c->counts[me]);
            break;
        case CP_ROUNDS: /* alltoallv: every arrival and its rounds word before any block */
            for (int r; (r = coll_taken(c, c->pos)) >= 0; c->pos++) {
                uint64_t *line = coll_line(c, r, c->k);
                int got = coll_spin(c, r, line, c->k, "arrive seq", spin_ns, yield);
                if (got <= 0)
                    return got < 0 ? NULL : coll_wait_tuple(c, r, line, c->k, "arrive seq");
                if (coll_rounds(c, r) < 0)
                    return NULL;
            }
            c->phase = CP_TAKE;
            c->pos = 0;
            break;
        case CP_TAKE:
            for (int r; (r = coll_taken(c, c->pos)) >= 0; c->pos++) {
                if (r != me && c->which != CW_ALLTOALLV) { /* (alltoallv: seen in CP_ROUNDS) */
                    uint64_t *line = coll_line(c, r, c->k);
                    int got = coll_spin(c, r, line, c->k, "arrive seq", spin_ns, yield);
                    if (got <= 0)
                        return got < 0 ? NULL : coll_wait_tuple(c, r, line, c->k, "arrive seq");
                }
                if (coll_consume(c, r) < 0)
                    return NULL;
            }
            c->phase = CP_END;
            break;
        default: { /* CP_END: the reads are over; nothing to store (see collective.py) */
            bool declined = c->declined;
            if (c->which == CW_SCATTERV && !declined && c->sround + 1 < c->srounds) {
                if (c->k >= COLL_SEQ_MASK) { /* (as CollectiveGroup._enter) */
                    coll_release_call(c);
                    PyErr_SetString(PyExc_OverflowError,
                                    "collective slot rounds exhausted; rebind the group");
                    return NULL;
                }
                c->sround++; /* the next round of this scatterv: its next pieces */
                c->k++;
                c->phase = CP_ENTER;
                c->pos = 0;
                break;
            }
            coll_release_call(c);
            return PyLong_FromLong(declined ? 1 : c->which == CW_SCATTERV && c->truncated ? 2 : 0);
        }
        }
    }
}

static int coll_vector(CollRound *c, PyObject *obj, Py_ssize_t *out, const char *what)
{
    PyObject *seq = PySequence_Fast(obj, "counts and displacements must be sequences");
    if (seq == NULL)
        return -1;
    if (PySequence_Fast_GET_SIZE(seq) != c->size) {
        PyErr_Format(PyExc_ValueError, "%s needs %d entries", what, c->size);
        Py_DECREF(seq);
        return -1;
    }
    for (int r = 0; r < c->size; r++) {
        out[r] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, r));
        if (out[r] == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        if (out[r] < 0) {
            PyErr_Format(PyExc_ValueError, "%s: negative entry %zd", what, out[r]);
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    return 0;
}

/* Every block r (counts[r] bytes at displs[r]) lies in `len` bytes and in `limit` bytes. */
static int coll_blocks(CollRound *c, const Py_ssize_t *counts, const Py_ssize_t *displs,
                       Py_ssize_t len, Py_ssize_t limit, const char *what)
{
    for (int r = 0; r < c->size; r++) {
        if (counts[r] > limit || displs[r] > len - counts[r]) {
            PyErr_Format(PyExc_ValueError, "%s block %d (%zd bytes at %zd) does not fit", what,
                         r, counts[r], displs[r]);
            return -1;
        }
    }
    return 0;
}

static int coll_buffer(PyObject *obj, Py_buffer *view, bool *has, bool writable)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    *has = true;
    return 0;
}

static int coll_begin(CollRound *c, PyObject *k_obj)
{
    if (c->broken != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(c->broken), c->broken);
        return -1;
    }
    if (c->active) {
        PyErr_SetString(PyExc_RuntimeError, "a collective round is in progress");
        return -1;
    }
    unsigned long long k = PyLong_AsUnsignedLongLong(k_obj);
    if (k == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (k < 1 || k > COLL_SEQ_MASK) {
        PyErr_Format(PyExc_ValueError, "round %llu out of range", k);
        return -1;
    }
    c->k = k;
    c->active = true;
    c->declined = false;
    c->phase = CP_ENTER;
    c->pos = 0;
    c->rounds_out = 0;
    c->sround = c->srounds = 0;
    c->sblock = 0;
    c->truncated = false;
    c->want = true;
    c->pieces = false;
    return 0;
}

static int coll_spin_args(PyObject *spin_obj, PyObject *yield_obj, long long *spin_ns, int *yield)
{
    if (as_long_long(spin_obj, spin_ns) < 0)
        return -1;
    *yield = PyObject_IsTrue(yield_obj);
    return *yield < 0 ? -1 : 0;
}

/* A gatherv's root or an allgatherv's member (`what`): every block of recv within it and
 * within `limit` bytes, this member's send (where it has one; none: in place) its count,
 * copied to its block of recv unless the round is declined (the messages copy it then).
 * 0, or -1 with ValueError (nothing copied). */
static int coll_own_block(CollRound *c, Py_ssize_t limit, const char *what)
{
    int me = c->rank;
    if (coll_blocks(c, c->counts, c->displs, c->recv.len, limit, "recv") < 0)
        return -1;
    if (!c->has_send)
        return 0;
    if (c->counts[me] != c->send.len) {
        PyErr_Format(PyExc_ValueError, "%s: this rank's count is not its send", what);
        return -1;
    }
    if (!c->declined)
        memmove((unsigned char *)c->recv.buf + c->displs[me], c->send.buf,
                (size_t)c->send.len);
    return 0;
}

/* The checks of a bcast, gatherv, scatterv, allgatherv or alltoallv call (c->which, root
 * c->root) whose buffers (send, recv) and vectors (bytes; a scatterv's blocks inside send) are
 * in place, then this member's own block copied where it stays (run() and front() share them;
 * run checks the others inline): 0, or -1 with ValueError (before the round: the caller
 * releases the call). */
static int coll_prepare(CollRound *c)
{
    int me = c->rank;
    bool is_root = me == c->root;
    switch (c->which) {
    case CW_BCAST:
        if (c->recv.len > c->slab_size) {
            PyErr_SetString(PyExc_ValueError, "bcast: more than one slab");
            return -1;
        }
        break;
    case CW_GATHERV: /* the root without send: in place (its block of recv is there) */
        /* Each member's block on its own, as the steps' max_rounds=1: one within a slab goes
         * in its member's slab, and that member returns once it published it (it never
         * waits for the root: a gather's non-root is done when its block is out, as an eager
         * send; step 1 of its next round waits until the root published this one, so the
         * root has read the slab before the member's round after next overwrites it); a
         * longer one is announced (nbytes: its length, no data) and goes by messages, the
         * caller's: its member declines itself, and the root, whose counts say which, takes
         * the announcement, checks its length and declines the round (those blocks and its
         * own then move by messages: rounds word 0). */
        if (!is_root) {
            c->declined = c->has_send && c->send.len > c->slab_size;
            break;
        }
        for (int q = 0; q < c->size; q++)
            if (c->counts[q] > c->slab_size)
                c->declined = true;
        if (coll_own_block(c, PY_SSIZE_T_MAX, "gatherv") < 0)
            return -1;
        c->rounds_out = !c->declined;
        break;
    case CW_SCATTERV: /* the root's recv None: in place (its block stays in send) */
        if (!is_root)
            break;
        if (c->has_recv && c->counts[me] != c->recv.len) {
            PyErr_SetString(PyExc_ValueError, "scatterv: the root's count is not its recv");
            return -1;
        }
        /* Another's block over a segment: where the largest takes no more rounds than there
         * are cells, that many rounds (rounds word: their count; each moves a segment of
         * every block; the root never waits for a reader's copy, and a reader copies one
         * cell while the root fills the next: at 2 ranks 512 KiB blocks took messages, the
         * root's own-block copy delaying its send, 77 us against MPICH's 56; where the
         * group is crowded messages would also wake each reader once per piece on CPUs
         * they share; more rounds would make each a rendezvous of all members, slower than
         * messages under load); else the root declines the round (rounds word 0, as the
         * steps' max_rounds=1), for the caller to move the blocks otherwise. */
        c->rounds_out = 1;
        for (int q = 0; q < c->size; q++)
            if (q != me && scatter_rounds(c, c->counts[q]) > c->rounds_out)
                c->rounds_out = scatter_rounds(c, c->counts[q]);
        if (c->rounds_out > COLL_CELLS)
            c->rounds_out = 0;
        c->srounds = c->rounds_out;
        c->declined = !c->rounds_out; /* (its own block: copied once the others' are out) */
        break;
    case CW_ALLGATHERV: /* without send: in place */
        return coll_own_block(c, c->slab_size, "allgatherv");
    case CW_ALLTOALLV:
        if (coll_blocks(c, c->counts, c->displs, c->send.len, PY_SSIZE_T_MAX, "send") < 0 ||
            coll_blocks(c, c->rcounts, c->rdispls, c->recv.len, PY_SSIZE_T_MAX, "recv") < 0)
            return -1;
        if (c->counts[me] != c->rcounts[me]) {
            PyErr_SetString(PyExc_ValueError, "alltoallv: this rank's own counts differ");
            return -1;
        }
        /* A block over a segment (sent or received): this member declines the round (rounds
         * word 0, as the steps' max_rounds=1), for the caller to move the blocks otherwise;
         * nothing is written then (the caller's other way copies the own block too). */
        c->rounds_out = 1;
        for (int q = 0; q < c->size; q++)
            if (c->counts[q] > c->sseg || c->rcounts[q] > c->sseg)
                c->rounds_out = 0;
        c->declined = !c->rounds_out; /* (its own block: copied once the others' are out) */
        break;
    default:
        break;
    }
    return 0;
}

static PyObject *coll_run_pieces(CollRound *c, PyObject *const *args, Py_ssize_t nargs,
                                 bool pieces);

/* pickling.bundle of `list` (one buffer per member: its pickles) as a new bytes object: the
 * pieces' end offsets (uint64 little-endian, counted from the end of that header), then the
 * pieces; Py_None (a new reference) where that is over a slab (nothing copied); NULL with
 * ValueError / TypeError (before any round) for another length or an item that is no
 * buffer. */
static PyObject *coll_bundle(CollRound *c, PyObject *list)
{
    Py_ssize_t n = PyList_GET_SIZE(list), got = 0, total = 8 * n;
    if (n != c->size) {
        PyErr_SetString(PyExc_ValueError, "a bundle holds one piece per member");
        return NULL;
    }
    Py_buffer *views = PyMem_Calloc((size_t)n, sizeof(Py_buffer));
    if (views == NULL)
        return PyErr_NoMemory();
    PyObject *bundle = NULL;
    for (; got < n; got++) {
        if (PyObject_GetBuffer(PyList_GET_ITEM(list, got), &views[got], PyBUF_SIMPLE) < 0)
            goto out;
        total += views[got].len;
    }
    if (total > c->slab_size) {
        bundle = Py_NewRef(Py_None);
        goto out;
    }
    if ((bundle = PyBytes_FromStringAndSize(NULL, total)) == NULL)
        goto out;
    unsigned char *head = (unsigned char *)PyBytes_AS_STRING(bundle), *at = head + 8 * n;
    uint64_t end = 0;
    for (Py_ssize_t q = 0; q < n; q++) {
        end += (uint64_t)views[q].len;
        uint64_t word = htole64(end);
        memcpy(head + 8 * q, &word, 8);
        if (views[q].len)
            memcpy(at, views[q].buf, (size_t)views[q].len);
        at += views[q].len;
    }
out:
    while (got > 0)
        PyBuffer_Release(&views[--got]);
    PyMem_Free(views);
    return bundle;
}

/* run(k, spin_ns, yield, which, send, recv, root, counts, displs, rcounts, rdispls) */
static PyObject *coll_run(CollRound *c, PyObject *const *args, Py_ssize_t nargs)
{
    return coll_run_pieces(c, args, nargs, false);
}

/* run(), a *_BYTES round taking each member's piece of its bundle where `pieces` */
static PyObject *coll_run_pieces(CollRound *c, PyObject *const *args, Py_ssize_t nargs,
                                 bool pieces)
{
    long long spin_ns;
    int yield, which, root;
    if (check_nargs("run", nargs, 11) < 0)
        return NULL;
    which = PyLong_AsLong(args[3]);
    root = PyLong_AsLong(args[6]);
    if (PyErr_Occurred() || coll_spin_args(args[1], args[2], &spin_ns, &yield) < 0)
        return NULL;
    if (which < CW_BARRIER || which > CW_ALLGATHER_BYTES || root < 0 || root >= c->size) {
        PyErr_Format(PyExc_ValueError, "bad collective %d or root %d", which, root);
        return NULL;
    }
    if (coll_begin(c, args[0]) < 0)
        return NULL;
    c->which = which;
    c->root = root;
    c->pieces = pieces;
    int me = c->rank;
    bool is_root = me == root;
    PyObject *send = args[4], *recv = args[5];
    bool ok = true;
    switch (which) {
    case CW_BCAST:
        ok = coll_buffer(send, &c->recv, &c->has_recv, !is_root) == 0;
        break;
    case CW_GATHERV:
        if (send != Py_None || !is_root)
            ok = coll_buffer(send, &c->send, &c->has_send, false) == 0;
        if (ok && is_root)
            ok = coll_buffer(recv, &c->recv, &c->has_recv, true) == 0 &&
                 coll_vector(c, args[7], c->counts, "recv counts") == 0 &&
                 coll_vector(c, args[8], c->displs, "recv displacements") == 0;
        break;
    case CW_SCATTERV: /* the root's recv None: in place (its block stays in send) */
        ok = (recv == Py_None && is_root) || coll_buffer(recv, &c->recv, &c->has_recv, true) == 0;
        if (ok && is_root) {
            ok = coll_buffer(send, &c->send, &c->has_send, false) == 0 &&
                 coll_vector(c, args[7], c->counts, "send counts") == 0 &&
                 coll_vector(c, args[8], c->displs, "send displacements") == 0 &&
                 coll_blocks(c, c->counts, c->displs, c->send.len, PY_SSIZE_T_MAX, "send") == 0;
        }
        break;
    case CW_ALLGATHERV:
        ok = (send == Py_None || coll_buffer(send, &c->send, &c->has_send, false) == 0) &&
             coll_buffer(recv, &c->recv, &c->has_recv, true) == 0 &&
             coll_vector(c, args[7], c->counts, "recv counts") == 0 &&
             coll_vector(c, args[8], c->displs, "recv displacements") == 0;
        break;
    case CW_ALLTOALLV:
        ok = coll_buffer(send, &c->send, &c->has_send, false) == 0 &&
             coll_buffer(recv, &c->recv, &c->has_recv, true) == 0 &&
             coll_vector(c, args[7], c->counts, "send counts") == 0 &&
             coll_vector(c, args[8], c->displs, "send displacements") == 0 &&
             coll_vector(c, args[9], c->rcounts, "recv counts") == 0 &&
             coll_vector(c, args[10], c->rdispls, "recv displacements") == 0;
        break;
    case CW_BCAST_BYTES:
    case CW_GATHER_BYTES:
    case CW_ALLGATHER_BYTES: {
        bool publishes = which == CW_ALLGATHER_BYTES || (which == CW_BCAST_BYTES) == is_root;
        Py_XSETREF(c->taken, PyList_New(c->size));
        ok = c->taken != NULL;
        for (int r = 0; ok && r < c->size; r++)
            PyList_SET_ITEM(c->taken, r, Py_NewRef(Py_None));
        if (ok && publishes && pieces && send == Py_None) { /* coll_bundle's: over a slab */
            c->rounds_out = 0;
            c->declined = true; /* the caller sends the pieces otherwise */
        } else if (ok && publishes) {
            ok = coll_buffer(send, &c->send, &c->has_send, false) == 0;
            c->rounds_out = ok && c->send.len <= c->slab_size;
            c->declined = !c->rounds_out; /* too large: the caller sends it otherwise */
        }
        break;
    }
    default:
        break;
    }
    if (!ok || coll_prepare(c) < 0) {
        coll_release_call(c);
        return NULL;
    }
    return coll_advance(c, spin_ns, yield);
}

/* The checks of a fold whose fields (kind, dtype, op, upto, scatter, want; a reduce-scatter's
 * counts and displs) and buffers (send; recv where it wants the result) are in place: the
 * operand whole elements within a slab (a reduce-scatter's: `total` bytes, the sum of the
 * counts), the result its size and aligned; sets nbytes and part. 0, or -1 with ValueError
 * (before the round: the caller releases the call). */
static int coll_fold_prepare(CollRound *c, Py_ssize_t total)
{
    Py_ssize_t itemsize = fold_itemsize[c->dtype];
    bool scatter = c->scatter;
    if (c->send.len > c->slab_size || c->send.len % itemsize ||
        (scatter && c->send.len != total)) {
        PyErr_SetString(PyExc_ValueError, scatter ? "fold: the operand is not sum(counts) bytes"
                                                  : "fold: the operand does not fit one slab");
        return -1;
    }
    c->nbytes = scatter ? c->seg * c->size : c->send.len;
    c->part = scatter ? c->counts[c->rank] : c->send.len;
    if (c->want && (c->recv.len != c->part || (c->part && (uintptr_t)c->recv.buf % itemsize))) {
        PyErr_SetString(PyExc_ValueError, "fold: the result buffer differs or is unaligned");
        return -1;
    }
    return 0;
}

/* fold(k, spin_ns, yield, kind, send, recv, upto, dtype, op[, counts]): recv (None: this
 * rank takes no result) = the operands of ranks 0 .. upto-1 folded in rank order. With
 * counts (bytes per member, each at most a segment, whole elements): a reduce-scatter, send
 * the blocks of every member one after the other (sum(counts) bytes), recv = block `rank`
 * of the operands of all members (upto = size) folded in rank order. The blocks travel as
 * the steps lay them out: block q at q * seg of the sender's slab, nbytes seg * size. */
static PyObject *coll_fold(CollRound *c, PyObject *const *args, Py_ssize_t nargs)
{
    long long spin_ns;
    int yield;
    if (nargs != 10 && check_nargs("fold", nargs, 9) < 0)
        return NULL;
    if (coll_spin_args(args[1], args[2], &spin_ns, &yield) < 0)
        return NULL;
    int kind = PyLong_AsLong(args[3]), upto = PyLong_AsLong(args[6]);
    int dtype = PyLong_AsLong(args[7]), op = PyLong_AsLong(args[8]);
    if (PyErr_Occurred())
        return NULL;
    bool scatter = nargs == 10;
    if (dtype < 0 || dtype >= CD_COUNT || op < 0 || op >= CO_COUNT || upto < 0 ||
        upto > c->size || (dtype >= CD_F4 && op >= CO_BAND) ||
        (scatter && (upto != c->size || args[5] == Py_None))) {
        PyErr_Format(PyExc_ValueError, "fold: bad element type %d, op %d or upto %d", dtype, op,
                     upto);
        return NULL;
    }
    if (coll_begin(c, args[0]) < 0)
        return NULL;
    Py_ssize_t itemsize = fold_itemsize[dtype], total = 0;
    if (scatter) {
        if (coll_vector(c, args[9], c->counts, "reduce-scatter counts") < 0) {
            coll_release_call(c);
            return NULL;
        }
        for (int q = 0; q < c->size; q++) {
            if (c->counts[q] > c->seg || c->counts[q] % itemsize) {
                PyErr_Format(PyExc_ValueError, "fold: block %d (%zd bytes) is not whole "
                             "elements within a segment", q, c->counts[q]);
                coll_release_call(c);
                return NULL;
            }
            c->displs[q] = total;
            total += c->counts[q];
        }
    }
    c->which = CW_FOLD;
    c->kind = kind;
    c->dtype = dtype;
    c->op = op;
    c->upto = upto;
    c->scatter = scatter;
    c->want = args[5] != Py_None && upto > 0;
    if (coll_buffer(args[4], &c->send, &c->has_send, false) < 0 ||
        (c->want && coll_buffer(args[5], &c->recv, &c->has_recv, true) < 0) ||
        coll_fold_prepare(c, total) < 0) {
        coll_release_call(c);
        return NULL;
    }
    return coll_advance(c, spin_ns, yield);
}

static PyObject *coll_resume(CollRound *c, PyObject *const *args, Py_ssize_t nargs)
{
    long long spin_ns;
    int yield;
    if (check_nargs("resume", nargs, 2) < 0 || coll_spin_args(args[0], args[1], &spin_ns, &yield) < 0)
        return NULL;
    if (!c->active) {
        PyErr_SetString(PyExc_RuntimeError, "no collective round in progress");
        return NULL;
    }
    return coll_advance(c, spin_ns, yield);
}

static PyObject *coll_abort(CollRound *c, PyObject *Py_UNUSED(ignored))
{
    coll_release_call(c);
    Py_RETURN_NONE;
}

static bool flat_format(const char *format);

/* ------------------------------------------------------------------------------------------
 * CollectiveRound.front: a blocking collective's call as the user wrote it (the buffer forms
 * codes pass on every call), its arguments parsed here by the rules of the Python lanes
 * (guest_lib/mpi/collectives.py: _lane, _operand, _a_bcast, _a_gather, _a_allgather, _a_fold)
 * and its round run as run() / fold() would, in one call. Anything those lanes would not take
 * (another form, a derived datatype, a user op, a count past the end, a read-only receive
 * buffer, more than a slab) returns None having touched nothing: the caller's Python path
 * then decides and reports, so the errors stay its own.
 * ------------------------------------------------------------------------------------------ */
enum {
    CF_BCAST, CF_GATHER, CF_ALLGATHER, CF_REDUCE, CF_ALLREDUCE, CF_SCAN, CF_EXSCAN,
    CF_REDUCE_SCATTER_BLOCK, CF_REDUCE_SCATTER, CF_SCATTER, CF_ALLTOALL, CF_ALLTOALLV,
    CF_BCAST_BYTES, CF_GATHER_BYTES, CF_ALLGATHER_BYTES, CF_SCATTER_BYTES, CF_ALLTOALL_BYTES,
    CF_BARRIER, /* (no arguments: Barrier's round, run()'s barrier) */
    CF_COUNT
};
/* A flag or-ed into front()'s `which` of a block collective (Bcast, Gather, Scatter, Allgather,
 * Alltoall and the folds but Reduce_scatter; never a vector one): a call whose message is no
 * byte on this member (a block form's, front_blocks' vectors not counted) is none on any (the
 * type signatures match), and returns E_EMPTY having taken no round, as MPICH returns from it
 * without a word (guest_lib.mpi.collectives: `_skip`, whose rules take every such form too). */
#define CF_EMPTY 64
#define E_EMPTY 3

/* set_front's tables: numpy.ndarray, MPI.IN_PLACE, and dicts keyed by id(): of a predefined
 * datatype that does not pack its size (buffers._PLAIN_SIZE) and its FOLD_DTYPES code (where
 * its numpy element is one whole unit of it); of a predefined op its FOLD_OPS code. NULL until
 * set: front() then takes nothing. */
static PyObject *front_ndarray, *front_in_place, *front_sizes, *front_folds, *front_ops;

/* FOLD_DTYPES code of the elements of a numpy buffer (native numeric format, `itemsize`), or
 * -1 (no fold in C for those). */
static int front_fold_code(const char *format, Py_ssize_t itemsize)
{
    if (format == NULL)
        return CD_U1;
    if (format[0] == '\0' || format[1] != '\0')
        return -1;
    int at = itemsize == 1 ? 0 : itemsize == 2 ? 1 : itemsize == 4 ? 2 : itemsize == 8 ? 3 : -1;
    if (at < 0)
        return -1;
    switch (format[0]) {
    case 'b': case 'h': case 'i': case 'l': case 'q':
        return CD_I1 + at;
    case 'B': case 'H': case 'I': case 'L': case 'Q':
        return CD_U1 + at;
    case 'f':
        return itemsize == 4 ? CD_F4 : -1;
    case 'd':
        return itemsize == 8 ? CD_F8 : -1;
    default:
        return -1;
    }
}

/* Look `key` up in `table` by id(): its int value, 0 when absent, -1 on an error. */
static long long front_lookup(PyObject *table, PyObject *key)
{
    PyObject *id = PyLong_FromVoidPtr(key);
    if (id == NULL)
        return -1;
    PyObject *found = PyDict_GetItemWithError(table, id); /* borrowed */
    Py_DECREF(id);
    if (found == NULL)
        return PyErr_Occurred() ? -1 : 0;
    return PyLong_AsLongLong(found);
}

/* front_lookup's memo, one per table, by the key's address: a key found in a table is a
 * predefined datatype or op, which lives as long as the process (set_front's tables name
 * them by id()), so its address names it for good; a key not found is not kept (it may die
 * and its address be reused). Direct-mapped; emptied by set_front. The GIL guards it. */
#define FRONT_MEMO 16
typedef struct {
    PyObject *key;
    long long value;
} FrontMemo;
static FrontMemo front_memo_sizes[FRONT_MEMO], front_memo_folds[FRONT_MEMO],
    front_memo_ops[FRONT_MEMO];

/* front_lookup(table, key) through `memo`. `lives`: the key is known to live for good (found
 * in front_sizes), so that its absence from this table (0) is kept too. */
static long long front_memo_lookup(FrontMemo *memo, PyObject *table, PyObject *key, bool lives)
{
    FrontMemo *slot = &memo[((uintptr_t)key >> 4) % FRONT_MEMO];
    if (slot->key == key)
        return slot->value;
    long long value = front_lookup(table, key);
    if (value > 0 || (value == 0 && lives && !PyErr_Occurred())) {
        slot->key = key;
        slot->value = value;
    }
    return value;
}

/* Whether an error of a buffer export is one that makes a form "not taken". */
static bool front_declines(void)
{
    if (!PyErr_ExceptionMatches(PyExc_TypeError) && !PyErr_ExceptionMatches(PyExc_ValueError) &&
        !PyErr_ExceptionMatches(PyExc_BufferError))
        return false;
    PyErr_Clear();
    return true;
}

/* A buffer argument of a lane (collectives.py's _lane, and _operand's forms): a numpy array
 * itself (C-contiguous, of a native numeric format, writable with `writable`), any other
 * buffer object itself (bytearray, array.array, mmap, memoryview: as a numpy array, but not
 * empty, and no FOLD_DTYPES code: _operand folds numpy arrays alone, and a bare bytearray
 * is BYTE there, not a number), or a list or
 * tuple [buf, count, datatype] (an int count >= 0) / (buf, datatype) naming a predefined
 * datatype that does not pack, over a C-contiguous buffer (writable with `writable`) that
 * holds count * blocks elements (without a count: whole elements, all of it). Held in `view`,
 * its len cut to those bytes. 1 taken: *elems its elements, *code their FOLD_DTYPES code (-1:
 * none); 0 not taken, nothing held (whatever else, errors of the spec included); -1 error. */
static int front_buffer(PyObject *obj, bool writable, Py_ssize_t blocks, Py_buffer *view,
                        Py_ssize_t *elems, int *code)
{
    PyObject *buf = obj, *key = NULL;
    long long count = -1, size = 1;
    bool array = Py_TYPE(obj) == (PyTypeObject *)front_ndarray;
    bool bare = array || (!PyList_CheckExact(obj) && !PyTuple_CheckExact(obj));
    *code = -1;
    if (bare && !array && !PyObject_CheckBuffer(obj))
        return 0;
    if (!bare) {
        Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
        PyObject **items = PySequence_Fast_ITEMS(obj);
        if (n == 3) {
            if (!PyLong_CheckExact(items[1]))
                return 0;
            count = PyLong_AsLongLong(items[1]);
            if (count == -1 && PyErr_Occurred()) {
                if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                    return -1;
                PyErr_Clear();
                return 0;
            }
            if (count < 0)
                return 0;
        } else if (n != 2)
            return 0;
        buf = items[0];
        key = items[n - 1];
        size = front_memo_lookup(front_memo_sizes, front_sizes, key, false);
        if (size <= 0)
            return size < 0 && PyErr_Occurred() ? -1 : 0;
        long long fold = front_memo_lookup(front_memo_folds, front_folds, key, true);
        if (fold < 0 && PyErr_Occurred())
            return -1;
        *code = fold > 0 ? (int)fold - 1 : -1; /* (stored + 1: 0 is "none") */
    }
    Py_INCREF(buf); /* (held while its exporter runs) */
    int got = PyObject_GetBuffer(buf, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT |
                                                (writable ? PyBUF_WRITABLE : 0));
    Py_DECREF(buf);
    if (got < 0)
        return front_declines() ? 0 : -1;
    Py_ssize_t total = view->len;
    if (bare) {
        if (!flat_format(view->format) || view->itemsize <= 0 || (!array && total == 0))
            goto none; /* (an empty one: MPI.IN_PLACE and BOTTOM export one too) */
        *code = array ? front_fold_code(view->format, view->itemsize) : -1;
        *elems = total / view->itemsize;
        return 1;
    }
    /* (flat_view's cast of a view of 2 dimensions or more with a 0 in its shape fails) */
    if (total == 0 && view->ndim != 1)
        goto none;
    if (count < 0) {
        if (total % size)
            goto none;
        *elems = total / size;
        return 1;
    }
    if (count > total / size / blocks)
        goto none;
    *elems = count * blocks;
    view->len = *elems * size;
    return 1;
none:
    PyBuffer_Release(view);
    return 0;
}

/* An int item of a vector spec (an exact int, not a bool) >= 0 and <= `most`: 1 with *out,
 * 0 not so (no error), -1 error. */
static int front_count(PyObject *item, Py_ssize_t most, Py_ssize_t *out)
{
    if (!PyLong_CheckExact(item))
        return 0;
    *out = PyLong_AsSsize_t(item);
    if (*out == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    return *out >= 0 && *out <= most;
}

/* `size` ints >= 0 and <= `most` of a vector spec's counts or displacements into out[] (in
 * elements): a list or tuple of exact ints (not bools), or a buffer of one dimension and a
 * native integer format "hHiIlLqQ" (array.array('i'), a numpy integer array: as
 * buffers._int_sequence). 1 read; 0 not so (no error); -1 error. */
static int front_ints(PyObject *obj, int size, Py_ssize_t most, Py_ssize_t *out)
{
    if (PyList_CheckExact(obj) || PyTuple_CheckExact(obj)) {
        if (PySequence_Fast_GET_SIZE(obj) != size)
            return 0;
        for (int r = 0; r < size; r++) {
            int ok = front_count(PySequence_Fast_ITEMS(obj)[r], most, &out[r]);
            if (ok <= 0)
                return ok;
        }
        return 1;
    }
    if (!PyObject_CheckBuffer(obj))
        return 0;
    Py_buffer ints;
    if (PyObject_GetBuffer(obj, &ints, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return front_declines() ? 0 : -1;
    const char *f = ints.format;
    int ok = ints.ndim == 1 && f != NULL && f[0] != '\0' && f[1] == '\0' &&
             strchr("hHiIlLqQ", f[0]) != NULL && ints.len == (Py_ssize_t)size * ints.itemsize;
    for (int r = 0; ok && r < size; r++) {
        const char *at = (const char *)ints.buf + (Py_ssize_t)r * ints.itemsize;
        long long value = -1; /* (an unsigned one over `most`: -1, refused) */
#define FRONT_INT(type, is_signed)                                                          \
    do {                                                                                   \
        type item;                                                                         \
        if (ints.itemsize != (Py_ssize_t)sizeof item) {                                    \
            ok = 0;                                                                        \
            break;                                                                         \
        }                                                                                  \
        memcpy(&item, at, sizeof item);                                                    \
        if (is_signed || (unsigned long long)item <= (unsigned long long)most)             \
            value = (long long)item;                                                       \
    } while (0)
        switch (f[0]) {
        case 'h': FRONT_INT(short, true); break;
        case 'H': FRONT_INT(unsigned short, false); break;
        case 'i': FRONT_INT(int, true); break;
        case 'I': FRONT_INT(unsigned int, false); break;
        case 'l': FRONT_INT(long, true); break;
        case 'L': FRONT_INT(unsigned long, false); break;
        case 'q': FRONT_INT(long long, true); break;
        default: FRONT_INT(unsigned long long, false); break;
        }
#undef FRONT_INT
        if (value < 0 || value > most)
            ok = 0;
        else
            out[r] = (Py_ssize_t)value;
    }
    PyBuffer_Release(&ints);
    return ok;
}

/* A vector spec with explicit counts (buffers.plain_vector's forms and rules): [buf, counts,
 * displs, datatype], [buf, (counts, displs), datatype] or [buf, counts, datatype]
 * (displacements contiguous; so is a displs of None), counts and displacements `size` ints
 * >= 0 each (front_ints: lists or tuples of ints, integer arrays) in units of a predefined
 * datatype that does not pack,
 * over a C-contiguous buffer (writable with `writable`) that holds every block. Held in
 * `view`; counts[r] and displs[r] are block r's bytes and byte offset. 1 taken; 0 not taken,
 * nothing held (whatever else: parse_vector decides and reports); -1 error. */
static int front_vector(PyObject *obj, int size, bool writable, Py_buffer *view,
                        Py_ssize_t *counts, Py_ssize_t *displs)
{
    if (!PyList_CheckExact(obj) && !PyTuple_CheckExact(obj))
        return 0;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
    PyObject **items = PySequence_Fast_ITEMS(obj);
    PyObject *cnt = n == 3 || n == 4 ? items[1] : NULL, *dsp = n == 4 ? items[2] : Py_None;
    if (cnt == NULL)
        return 0;
    if (n == 3 && PyTuple_CheckExact(cnt) && PyTuple_GET_SIZE(cnt) == 2) {
        dsp = PyTuple_GET_ITEM(cnt, 1);
        cnt = PyTuple_GET_ITEM(cnt, 0);
    }
    long long extent = front_memo_lookup(front_memo_sizes, front_sizes, items[n - 1], false);
    if (extent <= 0)
        return extent < 0 && PyErr_Occurred() ? -1 : 0;
    /* counts and displacements in elements first (copied out of the lists or arrays once:
     * an array's exporter is the only Python code that may run, before any is read), then
     * the buffer, then the bounds */
    Py_ssize_t running = 0, most = PY_SSIZE_T_MAX / (Py_ssize_t)extent / 2;
    int ok = front_ints(cnt, size, most, counts);
    if (ok > 0 && dsp != Py_None)
        ok = front_ints(dsp, size, most, displs);
    if (ok <= 0)
        return ok;
    for (int r = 0; r < size && dsp == Py_None; r++) {
        displs[r] = running;
        if (running > most) /* (past it: no buffer holds the block) */
            return 0;
        running += counts[r];
    }
    PyObject *buf = Py_NewRef(items[0]); /* (held while its exporter runs) */
    int got = PyObject_GetBuffer(buf, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT |
                                                (writable ? PyBUF_WRITABLE : 0));
    Py_DECREF(buf);
    if (got < 0)
        return front_declines() ? 0 : -1;
    /* (buffers._contiguous: an empty view of another shape or format is not cast) */
    if (view->len == 0 && (view->ndim != 1 || (view->format != NULL && strcmp(view->format, "B"))))
        goto none;
    for (int r = 0; r < size; r++) {
        counts[r] *= (Py_ssize_t)extent;
        displs[r] *= (Py_ssize_t)extent;
        if (displs[r] > view->len - counts[r]) /* (each at most PY_SSIZE_T_MAX / 2) */
            goto none;
    }
    return 1;
none:
    PyBuffer_Release(view);
    return 0;
}

/* A buffer argument that holds one block per member (collectives._blocks): c->size equal
 * blocks of a block form (front_buffer with blocks = size; its explicit count is one block),
 * or a vector spec's (front_vector: *vector set). Held in `view`; counts[r] and displs[r] are
 * block r's bytes and byte offset (c->size entries each); *code the elements' FOLD_DTYPES
 * code (-1: none, or a vector spec). 1 taken; 0 not taken, nothing held; -1 error. */
static int front_blocks(CollRound *c, PyObject *obj, bool writable, Py_buffer *view,
                        Py_ssize_t *counts, Py_ssize_t *displs, int *code, bool *vector)
{
    int size = c->size;
    Py_ssize_t elems;
    int got = front_buffer(obj, writable, size, view, &elems, code);
    *vector = got == 0;
    if (got == 0) {
        *code = -1;
        return front_vector(obj, size, writable, view, counts, displs);
    }
    if (got < 0)
        return -1;
    if (elems % size) {
        PyBuffer_Release(view);
        return 0;
    }
    Py_ssize_t block = view->len / size;
    for (int r = 0; r < size; r++) {
        counts[r] = block;
        displs[r] = block * r;
    }
    return 1;
}

/* front(k, spin_ns, yield, which, a, b, op, root[, quiet]): round k of blocking collective `which`
 * (CF_*) with the user's arguments: Bcast(a, root), Gather(a, b, root), Allgather(a, b),
 * Scatter(v)(a, b, root),
 * Reduce(a, b, op, root), Allreduce / Scan / Exscan / Reduce_scatter_block(a, b, op),
 * Reduce_scatter(a, b, root = recvcounts, op), Alltoall / Alltoallv(a, b), and the
 * lowercase collectives' byte-string rounds (CF_*_BYTES: a this member's bytes or None, root;
 * run()'s rounds of the same name; CF_SCATTER_BYTES and CF_ALLTOALL_BYTES: the bcast and
 * allgather rounds of pickling.bundle's bundles, `taken` holding this member's piece of
 * each), and Barrier (CF_BARRIER: no arguments, run()'s barrier round); the others'
 * unused ones are ignored. Results as run() / fold(), or E_EMPTY (3) for a call of no byte
 * with CF_EMPTY in `which` (no round taken); None having touched nothing where the
 * Python lanes would not take the arguments (see above), or where a container of the tuple
 * `quiet` (given: the engine's queues, Engine.queues) holds anything. */
static PyObject *coll_front(CollRound *c, PyObject *const *args, Py_ssize_t nargs)
{
    long long spin_ns;
    int yield;
    if (nargs != 9 && check_nargs("front", nargs, 8) < 0)
        return NULL;
    if (coll_spin_args(args[1], args[2], &spin_ns, &yield) < 0)
        return NULL;
    int which = PyLong_AsLong(args[3]);
    if (which == -1 && PyErr_Occurred())
        return NULL;
    bool empty_ok = which >= 0 && (which & CF_EMPTY) != 0;
    which &= ~CF_EMPTY;
    if (front_ndarray == NULL || which < 0 || which >= CF_COUNT)
        Py_RETURN_NONE;
    if (nargs == 9) { /* quiet: containers that must all be empty (as engine.quiet reads them) */
        if (!PyTuple_CheckExact(args[8])) {
            PyErr_SetString(PyExc_TypeError, "front(): quiet must be a tuple");
            return NULL;
        }
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args[8]); i++) {
            int busy = PyObject_IsTrue(PyTuple_GET_ITEM(args[8], i));
            if (busy < 0)
                return NULL;
            if (busy)
                Py_RETURN_NONE;
        }
    }
    PyObject *a = args[4], *b = args[5];
    int me = c->rank, size = c->size, root = 0, got = 0, cw = CW_FOLD, kind = 0, upto = size;
    int opcode = 0, cs = -1, cr = -1;
    bool want = true;
    if (which == CF_BCAST || which == CF_GATHER || which == CF_REDUCE || which == CF_SCATTER ||
        which == CF_BCAST_BYTES || which == CF_GATHER_BYTES || which == CF_SCATTER_BYTES) {
        if (!PyLong_CheckExact(args[7]))
            Py_RETURN_NONE;
        long r = PyLong_AsLong(args[7]);
        if (r == -1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                return NULL;
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        if (r < 0 || r >= size)
            Py_RETURN_NONE;
        root = (int)r;
    }
    if (which >= CF_BCAST_BYTES && which <= CF_ALLTOALL_BYTES) {
        /* a lowercase collective's pickles (a the bytes of this member, None where it
         * publishes none): run()'s byte-string round, its results in `taken` */
        PyObject *run_args[11] = {args[0], args[1], args[2], NULL, a, Py_None, NULL,
                                  Py_None, Py_None, Py_None, Py_None};
        bool pieces = which >= CF_SCATTER_BYTES; /* a bundle: the bcast / allgather round */
        PyObject *bundle = NULL;
        if (pieces && PyList_CheckExact(a)) { /* the pieces: bundled here (None: declined) */
            if ((bundle = coll_bundle(c, a)) == NULL)
                return NULL;
            run_args[4] = bundle;
        }
        int cw = which == CF_SCATTER_BYTES    ? CW_BCAST_BYTES
                 : which == CF_ALLTOALL_BYTES ? CW_ALLGATHER_BYTES
                                              : CW_BCAST_BYTES + which - CF_BCAST_BYTES;
        run_args[3] = PyLong_FromLong(cw);
        run_args[6] = PyLong_FromLong(root);
        PyObject *result = NULL;
        if (run_args[3] != NULL && run_args[6] != NULL)
            result = coll_run_pieces(c, run_args, 11, pieces);
        Py_XDECREF(bundle); /* (a round that goes on holds its buffer) */
        Py_XDECREF(run_args[3]);
        Py_XDECREF(run_args[6]);
        return result;
    }
    Py_buffer send, recv;
    bool has_send = false, has_recv = false, vs = false, vr = false; /* (vr, vs: vectors) */
    Py_ssize_t ns = 0, nr = 0, block = 0;
    switch (which) {
    case CF_BARRIER:
        cw = CW_BARRIER;
        break;
    case CF_BCAST:
        cw = CW_BCAST;
        if ((got = front_buffer(a, me != root, 1, &recv, &nr, &cr)) <= 0)
            goto out;
        has_recv = true;
        if (empty_ok && recv.len == 0)
            goto empty;
        if (recv.len > c->slab_size)
            goto none;
        break;
    case CF_GATHER:
    case CF_ALLGATHER: {
        cw = which == CF_GATHER ? CW_GATHERV : CW_ALLGATHERV;
        bool in_place = a == front_in_place || a == Py_None;
        bool gathers = which == CF_ALLGATHER || me == root;
        if (gathers) { /* (active: its counts are in use; begin refuses) */
            if (c->active)
                goto none;
            if ((got = front_blocks(c, b, true, &recv, c->counts, c->displs, &cr, &vr)) <= 0)
                goto out;
            has_recv = true;
            for (int q = 0; q < size && which == CF_ALLGATHER; q++)
                if (c->counts[q] > c->slab_size)
                    goto none;
        }
        /* (a gather's block over a slab: its round declined, then messages: _c_front) */
        if (!(in_place && gathers)) {
            if ((got = front_buffer(a, false, 1, &send, &ns, &cs)) <= 0)
                goto out;
            has_send = true;
            if ((which == CF_ALLGATHER && send.len > c->slab_size) ||
                (gathers && send.len != c->counts[me]))
                goto none;
        }
        if (empty_ok && (!has_send || send.len == 0) && (!gathers || (!vr && recv.len == 0)))
            goto empty;
        break;
    }
    case CF_SCATTER: { /* (as _a_scatter; a non-root's block over a segment: declined) */
        cw = CW_SCATTERV;
        if (c->active) /* (its counts are in use; begin refuses) */
            goto none;
        bool in_place = b == front_in_place || b == Py_None;
        if (me != root || !in_place) {
            if ((got = front_buffer(b, true, 1, &recv, &nr, &cr)) <= 0)
                goto out;
            has_recv = true;
        }
        if (me == root) {
            if ((got = front_blocks(c, a, false, &send, c->counts, c->displs, &cs, &vs)) <= 0)
                goto out;
            has_send = true;
            if (has_recv && recv.len != c->counts[me])
                goto none;
        }
        if (empty_ok && (!has_recv || recv.len == 0) && (!has_send || (!vs && send.len == 0)))
            goto empty;
        break;
    }
    case CF_ALLTOALL:
    case CF_ALLTOALLV: { /* (as _a_alltoall; Alltoall's blocks over a segment: its messages) */
        cw = CW_ALLTOALLV;
        if (c->active) /* (its vectors are in use; begin refuses) */
            goto none;
        if ((got = front_blocks(c, b, true, &recv, c->rcounts, c->rdispls, &cr, &vr)) <= 0)
            goto out;
        has_recv = true;
        for (int q = 0; which == CF_ALLTOALL && q < size; q++)
            if (c->rcounts[q] > c->sseg)
                goto none;
        /* in place: recv's blocks are the send blocks (a second export, read-only) */
        if ((got = front_blocks(c, a == front_in_place ? b : a, false, &send, c->counts,
                                c->displs, &cs, &vs)) <= 0)
            goto out;
        has_send = true;
        if (empty_ok && !vr && !vs && recv.len == 0 && send.len == 0)
            goto empty;
        break;
    }
    case CF_REDUCE_SCATTER_BLOCK:
    case CF_REDUCE_SCATTER: { /* (as _a_reduce_scatter(_block) and _a_scatter_fold) */
        long long found = front_memo_lookup(front_memo_ops, front_ops, args[6], false);
        if (found <= 0 || c->active) { /* (active: its counts are in use; begin refuses) */
            got = found < 0 && PyErr_Occurred() ? -1 : 0;
            goto out;
        }
        opcode = (int)found - 1; /* (stored + 1) */
        kind = CK_REDUCE_SCATTER;
        bool in_place = a == front_in_place;
        if ((got = front_buffer(b, true, 1, &recv, &nr, &cr)) <= 0)
            goto out;
        has_recv = true;
        if (cr < 0)
            goto none;
        Py_ssize_t itemsize = fold_itemsize[cr], sum = 0, most = 0; /* elements */
        if (which == CF_REDUCE_SCATTER) { /* recvcounts: `size` ints >= 0 */
            PyObject *counts = args[7];
            if ((!PyList_CheckExact(counts) && !PyTuple_CheckExact(counts)) ||
                PySequence_Fast_GET_SIZE(counts) != size)
                goto none;
            for (int q = 0; q < size; q++) {
                PyObject *item = PySequence_Fast_ITEMS(counts)[q];
                if (!PyLong_CheckExact(item))
                    goto none;
                c->counts[q] = PyLong_AsSsize_t(item);
                if (c->counts[q] == -1 && PyErr_Occurred()) {
                    PyErr_Clear(); /* (an overflow: not a count taken here) */
                    goto none;
                }
                if (c->counts[q] < 0 || c->counts[q] > c->seg / itemsize)
                    goto none;
            }
        } else {
            if (in_place && nr % size)
                goto none;
            for (int q = 0; q < size; q++)
                c->counts[q] = in_place ? nr / size : nr;
        }
        for (int q = 0; q < size; q++) {
            sum += c->counts[q];
            most = c->counts[q] > most ? c->counts[q] : most;
        }
        /* the result: recv (not in place: all of it) or its first counts[rank] elements */
        if (in_place ? c->counts[me] > nr : c->counts[me] != nr)
            goto none;
        if ((got = front_buffer(in_place ? b : a, false, 1, &send, &ns, &cs)) <= 0)
            goto out;
        has_send = true;
        if (cs != cr || (cs >= CD_F4 && opcode >= CO_BAND) || ns != sum ||
            most > c->seg / itemsize || (c->counts[me] && (uintptr_t)recv.buf % itemsize))
            goto none;
        if (empty_ok && ns == 0)
            goto empty;
        recv.len = c->counts[me] * itemsize;
        block = 0; /* (the counts in bytes, displacements: coll_fold's) */
        for (int q = 0; q < size; q++) {
            c->counts[q] *= itemsize;
            c->displs[q] = block;
            block += c->counts[q];
        }
        break;
    }
    default: { /* the folds */
        long long found = front_memo_lookup(front_memo_ops, front_ops, args[6], false);
        if (found <= 0) {
            got = found < 0 && PyErr_Occurred() ? -1 : 0;
            goto out;
        }
        opcode = (int)found - 1; /* (stored + 1) */
        kind = which == CF_REDUCE ? CK_REDUCE : which == CF_ALLREDUCE ? CK_ALLREDUCE
               : which == CF_SCAN ? CK_SCAN : CK_EXSCAN;
        want = which == CF_REDUCE ? me == root : which == CF_EXSCAN ? me > 0 : true;
        upto = which == CF_SCAN ? me + 1 : which == CF_EXSCAN ? me : size;
        bool in_place = a == front_in_place;
        if (which == CF_EXSCAN && me == 0) { /* its recvbuf is checked too (as the lane) */
            if ((got = front_buffer(b, true, 1, &recv, &nr, &cr)) <= 0)
                goto out;
            has_recv = true;
            if (!in_place) {
                PyBuffer_Release(&recv);
                has_recv = false;
            }
        } else if (want) {
            if ((got = front_buffer(b, true, 1, &recv, &nr, &cr)) <= 0)
                goto out;
            has_recv = true;
        }
        if (in_place && !has_recv)
            goto none;
        /* in place: the operand is recvbuf (a second export of it, read-only) */
        if ((got = front_buffer(in_place ? b : a, false, 1, &send, &ns, &cs)) <= 0)
            goto out;
        has_send = true;
        if (in_place && !want) { /* (Exscan's rank 0: recvbuf read only) */
            PyBuffer_Release(&recv);
            has_recv = false;
        }
        if (cs < 0 || (cs >= CD_F4 && opcode >= CO_BAND) || send.len > c->slab_size ||
            send.len % fold_itemsize[cs])
            goto none;
        if (has_recv && (cr != cs || nr != ns ||
                         (recv.len && (uintptr_t)recv.buf % fold_itemsize[cs])))
            goto none;
        /* (a receive side parsed and let go, Exscan's rank 0's, is of the same elements too) */
        if (empty_ok && ns == 0 && nr == 0 && (cr == cs || (which == CF_REDUCE && me != root)))
            goto empty;
        break;
    }
    }
    if (coll_begin(c, args[0]) < 0) {
        got = -1;
        goto out;
    }
    c->which = cw;
    c->root = root;
    c->has_send = has_send;
    c->has_recv = has_recv;
    if (has_send)
        c->send = send;
    if (has_recv)
        c->recv = recv;
    int prepared;
    if (cw == CW_FOLD) {
        c->kind = kind;
        c->dtype = cs;
        c->op = opcode;
        c->upto = upto;
        c->scatter = kind == CK_REDUCE_SCATTER;
        c->want = want && upto > 0;
        prepared = coll_fold_prepare(c, c->scatter ? block : 0);
    } else { /* (the vectors of a gather, scatter or alltoall: set by front_blocks above) */
        prepared = coll_prepare(c);
    }
    if (prepared < 0) {
        coll_release_call(c);
        return NULL;
    }
    return coll_advance(c, spin_ns, yield);
empty: /* (no round taken: nothing is read or written) */
    got = E_EMPTY;
    goto out;
none:
    got = 0;
out:
    if (has_send)
        PyBuffer_Release(&send);
    if (has_recv)
        PyBuffer_Release(&recv);
    if (got < 0)
        return NULL;
    if (got == E_EMPTY)
        return PyLong_FromLong(E_EMPTY);
    Py_RETURN_NONE;
}

static int coll_init(CollRound *c, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"region_buf", "blocks", "peers", "rank", "slot", "generation",
                             "slab_size", "segment", "kick", NULL};
    PyObject *buf, *blocks, *peers, *kick;
    int rank;
    long long slot;
    unsigned long long gen;
    Py_ssize_t slab_size, seg;
    if (c->arrive != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "CollectiveRound is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOiLKnnO", kwlist, &buf, &blocks, &peers,
                                     &rank, &slot, &gen, &slab_size, &seg, &kick))
        return -1;
    PyObject *bseq = PySequence_Fast(blocks, "blocks must be a sequence");
    if (bseq == NULL)
        return -1;
    PyObject *pseq = PySequence_Fast(peers, "peers must be a sequence");
    if (pseq == NULL) {
        Py_DECREF(bseq);
        return -1;
    }
    int size = (int)PySequence_Fast_GET_SIZE(bseq);
    int rc = -1;
    if (size < 1 || size > 4096 || PySequence_Fast_GET_SIZE(pseq) != size || rank < 0 ||
        rank >= size || slab_size <= 0 || seg <= 0 || seg * size > slab_size || gen < 1 ||
        gen > (1ULL << (64 - COLL_SEQ_BITS)) - 1 || !PyCallable_Check(kick)) {
        PyErr_SetString(PyExc_ValueError, "CollectiveRound: bad members, rank, sizes or kick");
        goto out;
    }
    if (PyObject_GetBuffer(buf, &c->view, PyBUF_WRITABLE) < 0)
        goto out;
    if (slab_size > c->view.len / COLL_CELLS) {
        PyErr_SetString(PyExc_ValueError, "CollectiveRound: slabs larger than the region");
        goto out;
    }
    c->size = size;
    c->rank = rank;
    c->slot = slot;
    c->gen = gen;
    c->slab_size = slab_size;
    c->seg = seg;
    c->sseg = size > 1 ? slab_size / (size - 1) / CACHE_LINE * CACHE_LINE : slab_size;
    c->sseg = c->sseg ? c->sseg : 1; /* (as CollectiveGroup._scatter_segment) */
    c->kick = Py_NewRef(kick);
    c->peers = PyMem_Calloc((size_t)size, sizeof(long long));
    c->arrive = PyMem_Calloc((size_t)size * (COLL_CELLS + 1), sizeof(uint64_t *));
    c->slab = PyMem_Calloc((size_t)size * COLL_CELLS, sizeof(unsigned char *));
    c->counts = PyMem_Calloc((size_t)size * 4, sizeof(Py_ssize_t));
    if (c->peers == NULL || c->arrive == NULL || c->slab == NULL || c->counts == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    c->sleep = c->arrive + size * COLL_CELLS;
    c->displs = c->counts + size;
    c->rcounts = c->counts + 2 * size;
    c->rdispls = c->counts + 3 * size;
    unsigned char *base = c->view.buf;
    for (int r = 0; r < size; r++) {
        Py_ssize_t block = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(bseq, r));
        c->peers[r] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(pseq, r));
        if (PyErr_Occurred())
            goto out;
        if (block < 0 || block % CACHE_LINE ||
            block > c->view.len - COLL_SLAB_OFFSET - COLL_CELLS * slab_size) {
            PyErr_Format(PyExc_ValueError, "member block %zd outside the region", block);
            goto out;
        }
        for (int cell = 0; cell < COLL_CELLS; cell++) {
            c->arrive[r * COLL_CELLS + cell] = (uint64_t *)(base + block + cell * COLL_LINE_STRIDE);
            c->slab[r * COLL_CELLS + cell] = base + block + COLL_SLAB_OFFSET + cell * slab_size;
        }
        c->sleep[r] = (uint64_t *)(base + block + COLL_SLEEP_OFFSET);
    }
    rc = 0;
out:
    Py_DECREF(bseq);
    Py_DECREF(pseq);
    return rc;
}

static int coll_traverse(CollRound *c, visitproc visit, void *arg)
{
    Py_VISIT(c->kick);
    Py_VISIT(c->broken);
    Py_VISIT(c->taken);
    return 0;
}

static int coll_clear(CollRound *c)
{
    Py_CLEAR(c->kick);
    Py_CLEAR(c->broken);
    Py_CLEAR(c->taken);
    return 0;
}

static void coll_dealloc(CollRound *c)
{
    PyObject_GC_UnTrack(c);
    coll_release_call(c);
    coll_clear(c);
    if (c->view.obj != NULL)
        PyBuffer_Release(&c->view);
    PyMem_Free(c->peers);
    PyMem_Free(c->arrive);
    PyMem_Free(c->slab);
    PyMem_Free(c->counts);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *coll_get_broken(CollRound *c, void *Py_UNUSED(closure))
{
    return Py_NewRef(c->broken != NULL ? c->broken : Py_None);
}

static PyMethodDef coll_methods[] = {
    {"run", (PyCFunction)(void (*)(void))coll_run, METH_FASTCALL,
     "run(k, spin_ns, yield_, which, send, recv, root, counts, displs, rcounts, rdispls): "
     "round k of a one-round collective (a scatterv of several: rounds k .. `round`); 0 "
     "done, 1 declined, or (rank, index, round, field) to block on before resume()."},
    {"fold", (PyCFunction)(void (*)(void))coll_fold, METH_FASTCALL,
     "fold(k, spin_ns, yield_, kind, send, recv, upto, dtype, op[, counts]): round k of a "
     "reduction (with counts, bytes per member: a reduce-scatter); results as run()."},
    {"resume", (PyCFunction)(void (*)(void))coll_resume, METH_FASTCALL,
     "resume(spin_ns, yield_): go on with the round in progress; results as run()."},
    {"front", (PyCFunction)(void (*)(void))coll_front, METH_FASTCALL,
     "front(k, spin_ns, yield_, which, a, b, op, root[, quiet]): round k of a blocking "
     "collective with the user's arguments; results as run(), None having touched nothing "
     "(also where a container of the tuple quiet holds anything)."},
    {"abort", (PyCFunction)coll_abort, METH_NOARGS,
     "Drop the round in progress (its buffers are released)."},
    {NULL, NULL, 0, NULL},
};

static PyObject *coll_get_taken(CollRound *c, void *Py_UNUSED(closure))
{
    return Py_NewRef(c->taken != NULL ? c->taken : Py_None);
}

static PyObject *coll_get_round(CollRound *c, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(c->k);
}

static PyGetSetDef coll_getset[] = {
    {"broken", (getter)coll_get_broken, NULL, "the error that broke the group, or None", NULL},
    {"round", (getter)coll_get_round, NULL,
     "the round the last call is at (or ended on): its k, later for a scatterv of several "
     "rounds", NULL},
    {"taken", (getter)coll_get_taken, NULL,
     "after a *_BYTES call: per member, the bytes taken from its slab, or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CollRoundType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ivshmem_comm._fastpath.CollectiveRound",
    .tp_doc = "One member's one-round collectives of a collective slot, each in one call "
              "(see collective.py).\n\nCollectiveRound(region_buf, blocks, peers, rank, slot, "
              "generation, slab_size, segment, kick).",
    .tp_basicsize = sizeof(CollRound),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)coll_init,
    .tp_dealloc = (destructor)coll_dealloc,
    .tp_traverse = (traverseproc)coll_traverse,
    .tp_clear = (inquiry)coll_clear,
    .tp_methods = coll_methods,
    .tp_getset = coll_getset,
};

/* ------------------------------------------------------------------------------------------
 * P2PLane: the blocking point-to-point fast paths of the MPI face (guest_lib/mpi/fastpath.py,
 * FastPaths.fast_send / fast_recv and the endpoint's fast paths under them) in one call each,
 * for a process whose only Python thread is the main one. It reads the Python state those
 * paths read, where they keep it, on every call:
 *   the engine's queues, posted / unexpected lists, pieces in flow, mpi4py requests, staged
 *   collectives and sync_next (containers the engine never rebinds: held here) and its
 *   `placing`; the endpoint's `_unexpected_count`, `_spin_ns`, `_yield_ns`, `_calm_until`
 *   (read, and written after a long yield: see rx_yield_poll) and `_expect` (a list it never
 *   rebinds), the peer slot words (region.u64[_word_i[p]], loaded once), each TxChannel's
 *   `tail` and `_kick`, each RxChannel's `_kick` (and `head`, set when a message is left
 *   peeked); the held spans of a receive ring stand for RxChannel.busy (a peeked head or a
 *   held message holds one);
 *   other_threads() as `_thread._count() - service[0]` (guest_lib.service_threads).
 * Whatever those paths would not take (another thread, anything queued or pending, a peer not
 * ready, a form of buffer spec flat_view does not take, a message that is not this call's)
 * returns having moved nothing, or with the message left peeked as the channel's head (as
 * recv_small_into does), for the Python paths to decide and report as ever.
 * ------------------------------------------------------------------------------------------ */
typedef struct {
    PyObject_HEAD
    PyObject *endpoint, *engine;
    PyObject *quiet;     /* tuple: the engine's containers that must all be empty (receive) */
    PyObject *sendq;     /* the engine's send queues by peer (a send needs none for its peer) */
    PyObject *sync_next; /* the engine's peers owing a synchronous message (receive: none) */
    PyObject *expect;    /* endpoint._expect */
    PyObject *count_fn;  /* _thread._count */
    PyObject *fault;     /* fault(peer, exc): a ring error's bookkeeping (raises, or None) */
    PyObject *service;   /* service_threads.running: [service threads running] */
    Py_ssize_t npeers;
    PyObject **txch, **rxch; /* by peer id: the endpoint's channels (NULL: this endpoint) */
    PyObject **txr, **rxr;   /* by peer id: their rings (C TxRing / RxRing, never rebound) */
    uint64_t **word;         /* by peer id: its peer slot word in the region */
    long long tag_ub, any_tag, whole_max, max_spin_ns;
    int ctx_shift;
} P2PLane;

static PyObject *lane_name_tail, *lane_name_kick, *lane_name_head, *lane_name_placing,
    *lane_name_unexpected, *lane_name_spin, *lane_name_yield,
    *lane_name_calm;              /* interned by the type's first instance */
static PyObject *lane_std_dumps; /* _pickle.dumps (pickle.dumps), by the first instance */

static int lane_clear(P2PLane *self)
{
    Py_CLEAR(self->endpoint);
    Py_CLEAR(self->engine);
    Py_CLEAR(self->quiet);
    Py_CLEAR(self->sendq);
    Py_CLEAR(self->sync_next);
    Py_CLEAR(self->expect);
    Py_CLEAR(self->count_fn);
    Py_CLEAR(self->fault);
    Py_CLEAR(self->service);
    for (Py_ssize_t p = 0; p < self->npeers; p++) {
        if (self->txch != NULL)
            Py_CLEAR(self->txch[p]);
        if (self->rxch != NULL)
            Py_CLEAR(self->rxch[p]);
        if (self->txr != NULL)
            Py_CLEAR(self->txr[p]);
        if (self->rxr != NULL)
            Py_CLEAR(self->rxr[p]);
    }
    return 0;
}

static int lane_traverse(P2PLane *self, visitproc visit, void *arg)
{
    Py_VISIT(self->endpoint);
    Py_VISIT(self->engine);
    Py_VISIT(self->quiet);
    Py_VISIT(self->sendq);
    Py_VISIT(self->sync_next);
    Py_VISIT(self->expect);
    Py_VISIT(self->count_fn);
    Py_VISIT(self->fault);
    Py_VISIT(self->service);
    for (Py_ssize_t p = 0; p < self->npeers; p++) {
        if (self->txch != NULL)
            Py_VISIT(self->txch[p]);
        if (self->rxch != NULL)
            Py_VISIT(self->rxch[p]);
        if (self->txr != NULL)
            Py_VISIT(self->txr[p]);
        if (self->rxr != NULL)
            Py_VISIT(self->rxr[p]);
    }
    return 0;
}

static void lane_dealloc(P2PLane *self)
{
    PyObject_GC_UnTrack(self);
    lane_clear(self);
    PyMem_Free(self->txch);
    PyMem_Free(self->rxch);
    PyMem_Free(self->txr);
    PyMem_Free(self->rxr);
    PyMem_Free(self->word);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Item p of the endpoint's list of channels `channels` in *out and its `ring`, of `type`, in
 * *ring (new references; both NULL for None: this endpoint). 0, or -1 on an error. */
static int lane_channel(PyObject *channels, Py_ssize_t p, PyTypeObject *type, PyObject **out,
                        PyObject **ring_out)
{
    PyObject *channel = PySequence_GetItem(channels, p);
    if (channel == NULL)
        return -1;
    *out = *ring_out = NULL;
    if (channel == Py_None) {
        Py_DECREF(channel);
        return 0;
    }
    PyObject *ring = PyObject_GetAttrString(channel, "ring");
    if (ring == NULL || !PyObject_TypeCheck(ring, type)) {
        if (ring != NULL)
            PyErr_Format(PyExc_TypeError, "P2PLane: channel of peer %zd has no C ring", p);
        Py_XDECREF(ring);
        Py_DECREF(channel);
        return -1;
    }
    *out = channel;
    *ring_out = ring;
    return 0;
}

static int lane_init(P2PLane *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"endpoint", "engine", "quiet", "sendq", "sync_next", "count",
                             "service", "fault", "tag_bits", "any_tag", "whole_max",
                             "max_spin_ns", NULL};
    PyObject *endpoint, *engine, *quiet, *sendq, *sync_next, *count_fn, *service, *fault;
    int tag_bits;
    long long any_tag, whole_max, max_spin_ns;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO!O!O!OO!OiLLL", kwlist, &endpoint, &engine,
                                     &PyTuple_Type, &quiet, &PyDict_Type, &sendq, &PyDict_Type,
                                     &sync_next, &count_fn, &PyList_Type, &service, &fault,
                                     &tag_bits, &any_tag, &whole_max, &max_spin_ns))
        return -1;
    if (self->npeers != 0 || self->endpoint != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "P2PLane: already initialized");
        return -1;
    }
    if (tag_bits < 1 || tag_bits > 30 || PyList_GET_SIZE(service) < 1) {
        PyErr_SetString(PyExc_ValueError, "P2PLane: tag_bits in 1..30, service [count]");
        return -1;
    }
    if (lane_name_tail == NULL) {
        if ((lane_name_tail = PyUnicode_InternFromString("tail")) == NULL ||
            (lane_name_kick = PyUnicode_InternFromString("_kick")) == NULL ||
            (lane_name_head = PyUnicode_InternFromString("head")) == NULL ||
            (lane_name_placing = PyUnicode_InternFromString("placing")) == NULL ||
            (lane_name_unexpected = PyUnicode_InternFromString("_unexpected_count")) == NULL ||
            (lane_name_spin = PyUnicode_InternFromString("_spin_ns")) == NULL ||
            (lane_name_yield = PyUnicode_InternFromString("_yield_ns")) == NULL ||
            (lane_name_calm = PyUnicode_InternFromString("_calm_until")) == NULL)
            return -1;
    }
    if (lane_std_dumps == NULL) {
        PyObject *pickle = PyImport_ImportModule("_pickle");
        lane_std_dumps = pickle == NULL ? NULL : PyObject_GetAttrString(pickle, "dumps");
        Py_XDECREF(pickle);
        if (lane_std_dumps == NULL)
            return -1;
    }
    PyObject *tx = PyObject_GetAttrString(endpoint, "tx");
    PyObject *rx = tx == NULL ? NULL : PyObject_GetAttrString(endpoint, "rx");
    PyObject *words = rx == NULL ? NULL : PyObject_GetAttrString(endpoint, "_word_i");
    PyObject *expect = words == NULL ? NULL : PyObject_GetAttrString(endpoint, "_expect");
    int status = -1;
    if (expect == NULL)
        goto done;
    Py_ssize_t n = PySequence_Size(tx);
    if (n < 0)
        goto done;
    if (!PyList_CheckExact(expect) || PyList_GET_SIZE(expect) != n ||
        PySequence_Size(rx) != n || PySequence_Size(words) != n) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "P2PLane: the endpoint's per-peer lists differ");
        goto done;
    }
    self->txch = PyMem_Calloc((size_t)n + 1, sizeof(PyObject *));
    self->rxch = PyMem_Calloc((size_t)n + 1, sizeof(PyObject *));
    self->txr = PyMem_Calloc((size_t)n + 1, sizeof(PyObject *));
    self->rxr = PyMem_Calloc((size_t)n + 1, sizeof(PyObject *));
    self->word = PyMem_Calloc((size_t)n + 1, sizeof(uint64_t *));
    if (self->txch == NULL || self->rxch == NULL || self->txr == NULL || self->rxr == NULL ||
        self->word == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    self->npeers = n;
    for (Py_ssize_t p = 0; p < n; p++) {
        if (lane_channel(tx, p, &TxRingType, &self->txch[p], &self->txr[p]) < 0 ||
            lane_channel(rx, p, &RxRingType, &self->rxch[p], &self->rxr[p]) < 0)
            goto done;
        if ((self->txch[p] == NULL) != (self->rxch[p] == NULL)) {
            PyErr_Format(PyExc_ValueError, "P2PLane: peer %zd has one channel of two", p);
            goto done;
        }
        if (self->txch[p] == NULL)
            continue;
        Ring *r = (Ring *)self->txr[p];
        PyObject *word_obj = PySequence_GetItem(words, p);
        Py_ssize_t w = word_obj == NULL ? -1 : PyLong_AsSsize_t(word_obj);
        Py_XDECREF(word_obj);
        if (w < 0 && PyErr_Occurred())
            goto done;
        if (w < 0 || w > r->view.len / 8 - 1) {
            PyErr_Format(PyExc_ValueError, "P2PLane: slot word %zd outside the region", w);
            goto done;
        }
        self->word[p] = (uint64_t *)r->base + w;
    }
    self->endpoint = Py_NewRef(endpoint);
    self->engine = Py_NewRef(engine);
    self->quiet = Py_NewRef(quiet);
    self->sendq = Py_NewRef(sendq);
    self->sync_next = Py_NewRef(sync_next);
    self->expect = Py_NewRef(expect);
    self->count_fn = Py_NewRef(count_fn);
    self->fault = Py_NewRef(fault);
    self->service = Py_NewRef(service);
    self->tag_ub = (1LL << tag_bits) - 1;
    self->ctx_shift = tag_bits;
    self->any_tag = any_tag;
    self->whole_max = whole_max;
    self->max_spin_ns = max_spin_ns;
    status = 0;
done:
    Py_XDECREF(tx);
    Py_XDECREF(rx);
    Py_XDECREF(words);
    Py_XDECREF(expect);
    return status;
}

/* An int attribute of `obj` (one the lane reads on each call): its value; -1 on an error. */
static long long lane_int_attr(PyObject *obj, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL)
        return -1;
    long long v = PyLong_AsLongLong(value);
    Py_DECREF(value);
    return v;
}

/* 1 when other threads run (other_threads() != 0: the lane is not for them), 0 when not, -1
 * on an error. */
static int lane_threads(P2PLane *self)
{
    PyObject *n = PyObject_CallNoArgs(self->count_fn);
    if (n == NULL)
        return -1;
    int cmp = PyObject_RichCompareBool(n, PyList_GET_ITEM(self->service, 0), Py_NE);
    Py_DECREF(n);
    return cmp;
}

/* Peer `peer_obj` as an index of the lane's tables with a channel: 1 (*peer set), 0 when it
 * is not one, -1 on an error. */
static int lane_peer(P2PLane *self, PyObject *peer_obj, Py_ssize_t *peer)
{
    if (!PyLong_CheckExact(peer_obj))
        return 0;
    Py_ssize_t p = PyLong_AsSsize_t(peer_obj);
    if (p == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    if (p < 0 || p >= self->npeers || self->txch[p] == NULL)
        return 0;
    *peer = p;
    return 1;
}

/* A buffer spec as the lane takes it (flat_view's rules, guest_lib.mpi.buffers.quick): a
 * numpy array or [buf, count, datatype] / (buf, datatype) as front_buffer takes them; else a
 * buffer object itself, not empty, C-contiguous, of a native numeric format. Writable with
 * `writable`. 1 held in `view` (its len the message's bytes), 0 not taken, -1 error. */
static int lane_buffer(PyObject *spec, bool writable, Py_buffer *view)
{
    if (front_sizes == NULL || front_ndarray == NULL)
        return 0; /* (front's tables not set: guest_lib.mpi.collectives not imported) */
    if (PyList_CheckExact(spec) || PyTuple_CheckExact(spec) ||
        Py_TYPE(spec) == (PyTypeObject *)front_ndarray) {
        Py_ssize_t elems;
        int code;
        return front_buffer(spec, writable, 1, view, &elems, &code);
    }
    if (PyObject_GetBuffer(spec, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT |
                                           (writable ? PyBUF_WRITABLE : 0)) < 0)
        return front_declines() ? 0 : -1;
    if (view->len > 0 && flat_format(view->format))
        return 1;
    PyBuffer_Release(view);
    return 0;
}

/* With an error set by a ring of peer `peer_obj` (PeerLostError, RingCorruptError): its
 * bookkeeping, fault(peer, exc) (FastPaths.lane_fault). 0 when that returned (the error
 * dealt with: the call declines), -1 with an error set (any other, or what fault raised). */
static int lane_fault(P2PLane *self, PyObject *peer_obj)
{
    if (!PyErr_ExceptionMatches(PeerLostError) && !PyErr_ExceptionMatches(RingCorruptError))
        return -1;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL)
        PyException_SetTraceback(value, tb);
    PyObject *done = PyObject_CallFunctionObjArgs(self->fault, peer_obj, value, NULL);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    Py_XDECREF(done);
    return done == NULL ? -1 : 0;
}

/* Call channel._kick(): the peer waits for a doorbell. 0, or -1 on an error. */
static int lane_kick(PyObject *channel)
{
    PyObject *done = PyObject_CallMethodNoArgs(channel, lane_name_kick);
    Py_XDECREF(done);
    return done == NULL ? -1 : 0;
}

/* The completions the receiver gave back, taken (TxChannel.send's reclaim, so that a queue
 * of sends only ever written here does not fill with completed ones): whether any came;
 * -1 with an error (the ring's: PeerLostError, RingCorruptError, for lane_fault). */
static int lane_reclaim(TxRing *tx)
{
    PyObject *n = tx_reclaim(tx, NULL);
    if (n == NULL)
        return -1;
    int got = PyObject_IsTrue(n);
    Py_DECREF(n);
    return got;
}

/* send(peer, ctx, tag, spec): FastPaths.fast_send(peer, ctx << tag_bits | tag, spec's
 * bytes, 0.0) of a plain spec (lane_buffer), with the endpoint's fast path: True once the
 * message is in the queue to core peer `peer` (whole, one span), the peer kicked if it must
 * be; False having moved nothing when the Python paths must decide (see P2PLane). When the
 * queue is full it takes the completions back first (an error of the ring then: lane_fault,
 * False if that returns). */
static PyObject *lane_send(P2PLane *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("send", nargs, 4) < 0)
        return NULL;
    Py_ssize_t p;
    int ok = lane_peer(self, args[0], &p);
    if (ok <= 0)
        return ok < 0 ? NULL : Py_NewRef(Py_False);
    long long ctx, tag;
    if (!PyLong_CheckExact(args[1]) || !PyLong_CheckExact(args[2]) ||
        as_long_long(args[1], &ctx) != 0 || as_long_long(args[2], &tag) != 0) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_FALSE;
    }
    if (tag < 0 || tag > self->tag_ub || ctx < 0 || ctx > (TAG_MAX >> self->ctx_shift))
        Py_RETURN_FALSE;
    if ((ok = lane_threads(self)) != 0)
        return ok < 0 ? NULL : Py_NewRef(Py_False);
    if ((ok = PyDict_Contains(self->sendq, args[0])) != 0)
        return ok < 0 ? NULL : Py_NewRef(Py_False);
    long long placing = lane_int_attr(self->engine, lane_name_placing);
    if (placing == -1 && PyErr_Occurred())
        return NULL;
    TxRing *tx = (TxRing *)self->txr[p];
    long long expect = PyLong_AsLongLong(PyList_GET_ITEM(self->expect, p));
    if (expect == -1 && PyErr_Occurred())
        return NULL;
    /* the peer bound and READY in the slot word seen (endpoint.send's check) */
    uint64_t word = __atomic_load_n(self->word[p], __ATOMIC_ACQUIRE);
    if (placing == p || tx->ring.broken != NULL || expect < 0 || word != (uint64_t)expect)
        Py_RETURN_FALSE;
    PyObject *tail = PyObject_GetAttr(self->txch[p], lane_name_tail);
    if (tail == NULL)
        return NULL;
    Py_DECREF(tail);
    if (tail != Py_None)
        Py_RETURN_FALSE;
    Py_buffer view;
    if ((ok = lane_buffer(args[3], false, &view)) <= 0)
        return ok < 0 ? NULL : Py_NewRef(Py_False);
    uint32_t coretag = (uint32_t)(ctx << self->ctx_shift | tag);
    int status = view.len > self->whole_max ? SEND_TOO_BIG
                                            : tx_send_bytes(tx, coretag, view.buf, view.len);
    if (status == SEND_FULL && (ok = lane_reclaim(tx)) != 0)
        status = ok < 0 ? SEND_ERROR : tx_send_bytes(tx, coretag, view.buf, view.len);
    PyBuffer_Release(&view);
    if (status == SEND_ERROR)
        return lane_fault(self, args[0]) < 0 ? NULL : Py_NewRef(Py_False);
    if (status == SEND_KICK && lane_kick(self->txch[p]) < 0)
        return NULL;
    return PyBool_FromLong(status == SEND_OK || status == SEND_KICK);
}

/* The least data of a "bulky" object: the standard pickler writes a payload this large
 * straight to a file (CPython's FRAME_SIZE_TARGET; see pickling.parts). */
#define BULKY_BYTES (64 << 10)

/* Whether `obj` is bulky: exact bytes, bytearray or str of `least` or more (bytes, or
 * characters), or another object that exports a buffer of as many bytes (a numpy array, an
 * array.array). 1 or 0; never an error (a buffer that cannot be had: 0). */
static int lane_bulky(PyObject *obj, Py_ssize_t least)
{
    if (PyBytes_CheckExact(obj))
        return PyBytes_GET_SIZE(obj) >= least;
    if (PyByteArray_CheckExact(obj))
        return PyByteArray_GET_SIZE(obj) >= least;
    if (PyUnicode_CheckExact(obj))
        return PyUnicode_GET_LENGTH(obj) >= least;
    if (!PyObject_CheckBuffer(obj))
        return 0;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_RECORDS_RO) < 0) {
        PyErr_Clear();
        return 0;
    }
    int bulky = view.len >= least;
    PyBuffer_Release(&view);
    return bulky;
}

/* send_obj(peer, ctx, tag, obj, dumps, protocol): an object send's fast path (the lowercase
 * send / isend of the MPI face): obj pickled, dumps(obj) with protocol None, else
 * dumps(obj, protocol), then, when that made bytes, lane_send of them. True once sent; else the
 * pickle (bytes or whatever dumps returned), sent nowhere, for the Python paths. None, having
 * pickled nothing, for a bulky object (lane_bulky) too large for one span of the queue to
 * `peer` when dumps is the standard pickle.dumps: the Python paths pickle it in parts
 * (pickling.parts). What dumps raises propagates (nothing
 * sent), as do lane_send's errors. */
static PyObject *lane_send_obj(P2PLane *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("send_obj", nargs, 6) < 0)
        return NULL;
    if (args[4] == lane_std_dumps) {
        Py_ssize_t p;
        int ok = lane_peer(self, args[0], &p);
        if (ok < 0)
            return NULL;
        /* bulky, and more than one span of the queue holds (lane_send sends one span) */
        Py_ssize_t span = ok ? ((Ring *)self->txr[p])->max_span - SPAN_HEADER_SIZE : 0;
        if (ok && lane_bulky(args[3], span > BULKY_BYTES ? span : BULKY_BYTES))
            Py_RETURN_NONE;
    }
    PyObject *call[2] = {args[3], args[5]};
    PyObject *data = PyObject_Vectorcall(args[4], call, args[5] == Py_None ? 1 : 2, NULL);
    if (data == NULL || !PyBytes_CheckExact(data))
        return data;
    PyObject *send[4] = {args[0], args[1], args[2], data};
    PyObject *sent = lane_send(self, send, 4);
    if (sent != Py_False) { /* True, or NULL with an error */
        Py_DECREF(data);
        return sent;
    }
    Py_DECREF(sent);
    return data;
}

/* recv(peer, ctx, tag, buf, want) and recv_obj(peer, ctx, tag, want) (`into` false, `buf`
 * NULL): FastPaths.fast_recv(peer, ctx, tag, buf) of a message that comes whole in one span,
 * with the endpoint's fast path (a spin of at most min(_spin_ns, max_spin_ns); with no spin,
 * the endpoint's yield phase, rx_yield_poll). recv: `buf` a
 * plain spec (lane_buffer, writable), True, or (nbytes, tag) with `want`, once the message is
 * in it; recv_obj: the message's bytes, or (nbytes, tag, bytes) with `want`. None having
 * taken nothing, when the Python paths must decide (see P2PLane; a message that came and is
 * not this call's is left peeked, the channel's head). An error of the ring: lane_fault,
 * None if that returns. */
static PyObject *lane_take(P2PLane *self, PyObject *const *args, bool into, PyObject *buf,
                           PyObject *want_obj)
{
    Py_ssize_t p;
    int ok = lane_peer(self, args[0], &p);
    if (ok <= 0)
        return ok < 0 ? NULL : Py_NewRef(Py_None);
    long long ctx, tag;
    if (!PyLong_CheckExact(args[1]) || !PyLong_CheckExact(args[2]) ||
        as_long_long(args[1], &ctx) != 0 || as_long_long(args[2], &tag) != 0) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    int want = PyObject_IsTrue(want_obj);
    if (want < 0)
        return NULL;
    if ((tag != self->any_tag && (tag < 0 || tag > self->tag_ub)) || ctx < 0)
        Py_RETURN_NONE;
    if ((ok = lane_threads(self)) != 0)
        return ok < 0 ? NULL : Py_NewRef(Py_None);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->quiet); i++) /* engine.quiet() */
        if ((ok = PyObject_IsTrue(PyTuple_GET_ITEM(self->quiet, i))) != 0)
            return ok < 0 ? NULL : Py_NewRef(Py_None);
    if ((ok = PyDict_Contains(self->sync_next, args[0])) != 0)
        return ok < 0 ? NULL : Py_NewRef(Py_None);
    long long unexpected = lane_int_attr(self->endpoint, lane_name_unexpected);
    long long spin_ns = unexpected != 0 ? 0 : lane_int_attr(self->endpoint, lane_name_spin);
    if ((unexpected == -1 || spin_ns == -1) && PyErr_Occurred())
        return NULL;
    RxRing *rx = (RxRing *)self->rxr[p];
    if (unexpected != 0 || rx->ring.broken != NULL || rx_held(rx) != 0)
        Py_RETURN_NONE;
    if (spin_ns > self->max_spin_ns)
        spin_ns = self->max_spin_ns;
    /* no spin (crowded): the endpoint's yield phase instead, if it has one (Endpoint.yield_us) */
    long long yield_ns = spin_ns > 0 ? 0 : lane_int_attr(self->endpoint, lane_name_yield);
    long long calm = yield_ns > 0 ? lane_int_attr(self->endpoint, lane_name_calm) : 0;
    if ((yield_ns == -1 || calm == -1) && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (into && (ok = lane_buffer(buf, true, &view)) <= 0)
        return ok < 0 ? NULL : Py_NewRef(Py_None);
    uint64_t addr, total, calm_until = (uint64_t)calm;
    uint32_t length;
    int32_t coretag;
    PyObject *result = NULL, *data = NULL;
    int found = yield_ns > 0 ? rx_yield_poll(rx, yield_ns, &calm_until, &addr, &length)
                             : rx_spin_poll(rx, spin_ns, &addr, &length);
    if (calm_until != (uint64_t)calm) { /* a long yield: the endpoint's waits calm down too */
        PyObject *value = PyLong_FromUnsignedLongLong(calm_until);
        int set = value == NULL ? -1 : PyObject_SetAttr(self->endpoint, lane_name_calm, value);
        Py_XDECREF(value);
        if (set < 0)
            goto done;
    }
    if (found > 0 && rx_header(rx, addr, length, &total, &coretag) < 0)
        found = -1;
    if (found <= 0) {
        result = found < 0 && lane_fault(self, args[0]) < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    uint32_t bits = (uint32_t)coretag;
    long long got_tag = (long long)(bits & (uint32_t)self->tag_ub);
    if (length - SPAN_HEADER_SIZE != total || (bits >> self->ctx_shift) != (uint64_t)ctx ||
        (tag != self->any_tag && got_tag != tag) || (into && total > (uint64_t)view.len)) {
        /* not this call's (or not whole in one span): left peeked, the channel's head */
        PyObject *head = Py_BuildValue("(KIKi)", (unsigned long long)addr, (unsigned int)length,
                                       (unsigned long long)total, (int)coretag);
        if (head != NULL && PyObject_SetAttr(self->rxch[p], lane_name_head, head) == 0)
            result = Py_NewRef(Py_None);
        Py_XDECREF(head);
        goto done;
    }
    if (!into && (data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total)) == NULL)
        goto done; /* (the span stays held: RxChannel.busy sees it, the Python paths go on) */
    void *dest = into ? view.buf : PyBytes_AS_STRING(data);
    if (rx_take_one(rx, addr, total, dest) && lane_kick(self->rxch[p]) < 0)
        goto done;
    if (!want)
        result = into ? Py_NewRef(Py_True) : Py_NewRef(data);
    else if (into)
        result = Py_BuildValue("(KL)", (unsigned long long)total, got_tag);
    else
        result = Py_BuildValue("(KLO)", (unsigned long long)total, got_tag, data);
done:
    Py_XDECREF(data);
    if (into)
        PyBuffer_Release(&view);
    return result;
}

static PyObject *lane_recv(P2PLane *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("recv", nargs, 5) < 0)
        return NULL;
    return lane_take(self, args, true, args[3], args[4]);
}

static PyObject *lane_recv_obj(P2PLane *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("recv_obj", nargs, 4) < 0)
        return NULL;
    return lane_take(self, args, false, NULL, args[3]);
}

static PyMethodDef lane_methods[] = {
    {"send", (PyCFunction)(void (*)(void))lane_send, METH_FASTCALL,
     "send(peer, ctx, tag, spec): a blocking send's fast path in one call; True when sent."},
    {"send_obj", (PyCFunction)(void (*)(void))lane_send_obj, METH_FASTCALL,
     "send_obj(peer, ctx, tag, obj, dumps, protocol): an object send's fast path in one call; "
     "True when sent, else the pickle (None: a bulky object, not pickled)."},
    {"recv", (PyCFunction)(void (*)(void))lane_recv, METH_FASTCALL,
     "recv(peer, ctx, tag, buf, want): a blocking receive's fast path in one call; None: not "
     "taken."},
    {"recv_obj", (PyCFunction)(void (*)(void))lane_recv_obj, METH_FASTCALL,
     "recv_obj(peer, ctx, tag, want): an object receive's fast path in one call (its bytes); "
     "None: not taken."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject P2PLaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ivshmem_comm._fastpath.P2PLane",
    .tp_doc = "The blocking point-to-point fast paths of the MPI face in one call each.\n\n"
              "P2PLane(endpoint, engine, quiet, sendq, sync_next, count, service, fault, "
              "tag_bits, any_tag, whole_max, max_spin_ns).",
    .tp_basicsize = sizeof(P2PLane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lane_init,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_traverse = (traverseproc)lane_traverse,
    .tp_clear = (inquiry)lane_clear,
    .tp_methods = lane_methods,
};

/* ------------------------------------------------------------------------------------------
 * The object point-to-point methods' C front (guest_lib.mpi.comm: Comm.send, Comm.isend and
 * Comm.recv, made by obj_methods): method descriptors of the communicator class that run the
 * common case of each in C, without the Python method's frame (~200 ns a call), and hand
 * anything else to the Python method or its continuation, which then decides and reports as
 * ever. The way to a rank on shared memory is the communicator's `_isend_at[rank]`, (lane,
 * peer, ctx, done op) as Isend keeps it (emptied with _shm_peer); where it is missing, it is
 * looked up as the Python methods do (rank a key of `_shm_peer`, the engine's `lane` a
 * P2PLane, the context `_ctx`) and stored there, as Isend stores it.
 *   send(obj, dest, tag=0) and isend(obj, dest, tag=0): `dest` an int with a way, `tag` an
 *     int in 0..tag_ub: lane.send_obj(peer, ctx, tag, obj, pickle._dumps, pickle._protocol)
 *     (pickle: MPI.pickle, its attributes read on each call, so that a user's dumps and
 *     PROTOCOL hold); sent: None, or isend's complete request (the done op's, as Isend's);
 *     else send_unsent / isend_unsent(self, obj, dest, tag, peer, what send_obj returned).
 *   recv(buf=None, source=ANY_SOURCE, tag=ANY_TAG, status=None): no buf, `source` an int with
 *     a way (ANY_SOURCE: the other rank of a two-member communicator whose other member is
 *     on shared memory, Comm._sole_source), `tag` in 0..tag_ub or ANY_TAG:
 *     lane.recv_obj(peer, ctx, tag, want status), the status set (status._set(rank, tag,
 *     nbytes)) and pickle._loads of the bytes (an empty message: None, mpi4py's rule);
 *     nothing taken there: recv_left(self, rank, tag, status, peer, source).
 * Any other form of call (other arguments, an unknown keyword, a name given twice) calls the
 * Python method with the same arguments, for it to take or to raise what it raises.
 * ------------------------------------------------------------------------------------------ */
enum { OBJ_SEND, OBJ_ISEND, OBJ_RECV, OBJ_N };
static PyObject *obj_python_of[OBJ_N]; /* the Python methods */
static PyObject *obj_left_of[OBJ_N];   /* their continuations (see above) */
static PyObject *obj_pickle, *obj_done, *obj_any_source;
static PyObject *obj_name_shm_peer, *obj_name_engine, *obj_name_lane, *obj_name_ctx,
    *obj_name_at, *obj_name_group, *obj_name_world, *obj_name_set, *obj_name_dumps,
    *obj_name_protocol, *obj_name_loads;
static PyObject *obj_kw_send[3], *obj_kw_recv[4]; /* the methods' parameter names, interned */

/* The arguments of a call with `names` (n parameters, positional or keyword) in out[i]
 * (borrowed; NULL where not given): 1; 0 for a call the front does not read (more than n
 * positional arguments, a keyword not among `names` by identity, a parameter given twice:
 * the Python method reports it). Keyword names of a call site are interned, so identity
 * finds them; a name that is not (a **kwargs built at run time) just takes the Python way. */
static int obj_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                    PyObject *const *names, int n, PyObject **out)
{
    if (nargs > n)
        return 0;
    for (int i = 0; i < n; i++)
        out[i] = i < nargs ? args[i] : NULL;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int i = 0;
        while (i < n && key != names[i])
            i++;
        if (i == n || out[i] != NULL)
            return 0;
        out[i] = args[nargs + k];
    }
    return 1;
}

/* `func(self, *args, **kw)` of a vectorcall's arguments (the Python method). */
static PyObject *obj_python(PyObject *func, PyObject *self, PyObject *const *args,
                            Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t total = nargs + (kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames));
    PyObject *small[8], **all = small;
    if (total >= 8 && (all = PyMem_Malloc((size_t)(total + 1) * sizeof(PyObject *))) == NULL)
        return PyErr_NoMemory();
    all[0] = self;
    if (total > 0)
        memcpy(all + 1, args, (size_t)total * sizeof(PyObject *));
    PyObject *result = PyObject_Vectorcall(func, all, nargs + 1, kwnames);
    if (all != small)
        PyMem_Free(all);
    return result;
}

/* The rank a receive from `source` (an exact int) takes: `source` itself (new reference), or
 * for ANY_SOURCE (-2) the other rank of a two-member communicator, this process one of them,
 * whose other member is on shared memory (Comm._sole_source); NULL, no error set, where there
 * is none (the Python method decides). */
static PyObject *obj_source(PyObject *self, PyObject *source)
{
    int overflow;
    if (PyLong_AsLongLongAndOverflow(source, &overflow) != -2 || overflow != 0)
        return Py_NewRef(source);
    PyObject *peers = PyObject_GetAttr(self, obj_name_shm_peer);
    PyObject *group = peers == NULL ? NULL : PyObject_GetAttr(self, obj_name_group);
    PyObject *engine = group == NULL ? NULL : PyObject_GetAttr(self, obj_name_engine);
    PyObject *world = engine == NULL ? NULL : PyObject_GetAttr(engine, obj_name_world);
    PyObject *rank = NULL;
    Py_ssize_t at = 0;
    PyObject *key, *value;
    if (world != NULL && PyDict_CheckExact(peers) && PyDict_GET_SIZE(peers) == 1 &&
        PyList_CheckExact(group) && PyList_GET_SIZE(group) == 2 &&
        PyDict_Next(peers, &at, &key, &value) && PyLong_CheckExact(key)) {
        long long r = PyLong_AsLongLongAndOverflow(key, &overflow);
        if (overflow == 0 && (r == 0 || r == 1) &&
            PyObject_RichCompareBool(PyList_GET_ITEM(group, 1 - r), world, Py_EQ) == 1)
            rank = Py_NewRef(key);
    }
    PyErr_Clear();
    Py_XDECREF(peers);
    Py_XDECREF(group);
    Py_XDECREF(engine);
    Py_XDECREF(world);
    return rank;
}

/* The way to communicator rank `rank` of `self` (see above): the tuple (lane, peer, ctx, done)
 * (new reference); NULL, no error set, where there is none (not a key of an exact-dict
 * _shm_peer, no lane, an attribute missing, an unhashable rank: the Python method decides
 * and raises). */
static PyObject *obj_way(PyObject *self, PyObject *rank)
{
    PyObject *cache = PyObject_GetAttr(self, obj_name_at);
    PyObject *at = cache != NULL && PyDict_CheckExact(cache) ? PyDict_GetItemWithError(cache, rank)
                                                             : NULL;
    if (at != NULL && PyTuple_CheckExact(at) && PyTuple_GET_SIZE(at) == 4 &&
        PyObject_TypeCheck(PyTuple_GET_ITEM(at, 0), &P2PLaneType)) {
        Py_INCREF(at);
        Py_DECREF(cache);
        return at;
    }
    at = NULL;
    PyObject *peers = cache == NULL || PyErr_Occurred()
                          ? NULL : PyObject_GetAttr(self, obj_name_shm_peer);
    PyObject *peer = peers != NULL && PyDict_CheckExact(peers) ? PyDict_GetItemWithError(peers, rank)
                                                               : NULL;
    PyObject *engine = peer == NULL ? NULL : PyObject_GetAttr(self, obj_name_engine);
    PyObject *lane = engine == NULL ? NULL : PyObject_GetAttr(engine, obj_name_lane);
    PyObject *ctx = lane == NULL ? NULL : PyObject_GetAttr(self, obj_name_ctx);
    if (ctx != NULL && PyObject_TypeCheck(lane, &P2PLaneType) && PyDict_CheckExact(cache) &&
        (at = PyTuple_Pack(4, lane, peer, ctx, obj_done)) != NULL &&
        PyDict_SetItem(cache, rank, at) < 0)
        Py_CLEAR(at);
    PyErr_Clear();
    Py_XDECREF(cache);
    Py_XDECREF(peers);
    Py_XDECREF(engine);
    Py_XDECREF(lane);
    Py_XDECREF(ctx);
    return at;
}

/* A tag as the lane takes it: an exact int in 0..tag_ub, or any_tag with `any`. */
static bool obj_tag(P2PLane *lane, PyObject *tag, bool any)
{
    if (!PyLong_CheckExact(tag))
        return false;
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(tag, &overflow);
    return overflow == 0 &&
           ((value >= 0 && value <= lane->tag_ub) || (any && value == lane->any_tag));
}

/* send and isend (`which`), see above. */
static PyObject *obj_send_impl(int which, PyObject *self, PyObject *const *args,
                               Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *a[3], *at;
    if (!obj_args(args, nargs, kwnames, obj_kw_send, 3, a) || a[0] == NULL || a[1] == NULL ||
        !PyLong_CheckExact(a[1]) || (at = obj_way(self, a[1])) == NULL)
        return obj_python(obj_python_of[which], self, args, nargs, kwnames);
    P2PLane *lane = (P2PLane *)PyTuple_GET_ITEM(at, 0);
    PyObject *peer = PyTuple_GET_ITEM(at, 1);
    PyObject *result = NULL, *dumps = NULL, *protocol = NULL, *sent = NULL;
    PyObject *tag = a[2] != NULL ? Py_NewRef(a[2]) : PyLong_FromLong(0);
    if (tag == NULL)
        goto done;
    if (!obj_tag(lane, tag, false)) {
        result = obj_python(obj_python_of[which], self, args, nargs, kwnames);
        goto done;
    }
    if ((dumps = PyObject_GetAttr(obj_pickle, obj_name_dumps)) == NULL ||
        (protocol = PyObject_GetAttr(obj_pickle, obj_name_protocol)) == NULL)
        goto done;
    PyObject *call[6] = {peer, PyTuple_GET_ITEM(at, 2), tag, a[0], dumps, protocol};
    if ((sent = lane_send_obj(lane, call, 6)) == NULL)
        goto done;
    if (sent == Py_True)
        result = which == OBJ_SEND ? Py_NewRef(Py_None)
                                   : p2preq_request(PyTuple_GET_ITEM(at, 3), lane->engine,
                                                    Py_None, Py_None);
    else {
        PyObject *rest[6] = {self, a[0], a[1], tag, peer, sent};
        result = PyObject_Vectorcall(obj_left_of[which], rest, 6, NULL);
    }
done:
    Py_XDECREF(tag);
    Py_XDECREF(sent);
    Py_XDECREF(dumps);
    Py_XDECREF(protocol);
    Py_DECREF(at);
    return result;
}

static PyObject *obj_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames)
{
    return obj_send_impl(OBJ_SEND, self, args, nargs, kwnames);
}

static PyObject *obj_isend(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    return obj_send_impl(OBJ_ISEND, self, args, nargs, kwnames);
}

static PyObject *obj_recv(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames)
{
    PyObject *a[4], *rank = NULL, *at = NULL;
    if (!obj_args(args, nargs, kwnames, obj_kw_recv, 4, a) ||
        (a[0] != NULL && a[0] != Py_None) || (a[1] != NULL && !PyLong_CheckExact(a[1])))
        return obj_python(obj_python_of[OBJ_RECV], self, args, nargs, kwnames);
    PyObject *source = a[1] != NULL ? a[1] : obj_any_source;
    PyObject *status = a[3] != NULL ? a[3] : Py_None;
    if ((rank = obj_source(self, source)) == NULL || (at = obj_way(self, rank)) == NULL) {
        Py_XDECREF(rank);
        return obj_python(obj_python_of[OBJ_RECV], self, args, nargs, kwnames);
    }
    P2PLane *lane = (P2PLane *)PyTuple_GET_ITEM(at, 0);
    PyObject *peer = PyTuple_GET_ITEM(at, 1);
    PyObject *result = NULL, *got = NULL, *loads = NULL, *data;
    PyObject *tag = a[2] != NULL ? Py_NewRef(a[2]) : PyLong_FromLongLong(lane->any_tag);
    if (tag == NULL)
        goto done;
    if (!obj_tag(lane, tag, true)) {
        result = obj_python(obj_python_of[OBJ_RECV], self, args, nargs, kwnames);
        goto done;
    }
    PyObject *take[3] = {peer, PyTuple_GET_ITEM(at, 2), tag};
    if ((got = lane_take(lane, take, false, NULL, status != Py_None ? Py_True : Py_False)) == NULL)
        goto done;
    if (got == Py_None) {
        PyObject *rest[6] = {self, rank, tag, status, peer, source};
        result = PyObject_Vectorcall(obj_left_of[OBJ_RECV], rest, 6, NULL);
        goto done;
    }
    data = got;
    if (status != Py_None) { /* (nbytes, tag, bytes) */
        PyObject *set = PyObject_CallMethodObjArgs(status, obj_name_set, rank,
                                                   PyTuple_GET_ITEM(got, 1),
                                                   PyTuple_GET_ITEM(got, 0), NULL);
        if (set == NULL)
            goto done;
        Py_DECREF(set);
        data = PyTuple_GET_ITEM(got, 2);
    }
    if (PyBytes_GET_SIZE(data) == 0)
        result = Py_NewRef(Py_None);
    else if ((loads = PyObject_GetAttr(obj_pickle, obj_name_loads)) != NULL)
        result = PyObject_CallOneArg(loads, data);
done:
    Py_XDECREF(tag);
    Py_XDECREF(got);
    Py_XDECREF(loads);
    Py_DECREF(rank);
    Py_DECREF(at);
    return result;
}

static PyMethodDef obj_defs[OBJ_N] = {
    {"send", (PyCFunction)(void (*)(void))obj_send, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"isend", (PyCFunction)(void (*)(void))obj_isend, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"recv", (PyCFunction)(void (*)(void))obj_recv, METH_FASTCALL | METH_KEYWORDS, NULL},
};

/* obj_methods(cls, send, send_unsent, isend, isend_unsent, recv, recv_left, pickle, done):
 * the C fronts of cls.send, cls.isend and cls.recv (method descriptors of `cls`, see above,
 * each with the Python method's docstring) over the Python methods and their continuations;
 * (send, isend, recv). `done`: the complete op of the ways stored in _isend_at. A later call
 * replaces what an earlier one set. */
static PyObject *obj_methods(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("obj_methods", nargs, 9) < 0)
        return NULL;
    if (!PyType_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "obj_methods: cls must be a type");
        return NULL;
    }
    if (obj_name_shm_peer == NULL) {
        static const char *const send_names[3] = {"obj", "dest", "tag"};
        static const char *const recv_names[4] = {"buf", "source", "tag", "status"};
        if ((obj_name_shm_peer = PyUnicode_InternFromString("_shm_peer")) == NULL ||
            (obj_name_engine = PyUnicode_InternFromString("_engine")) == NULL ||
            (obj_name_lane = PyUnicode_InternFromString("lane")) == NULL ||
            (obj_name_ctx = PyUnicode_InternFromString("_ctx")) == NULL ||
            (obj_name_at = PyUnicode_InternFromString("_isend_at")) == NULL ||
            (obj_name_group = PyUnicode_InternFromString("_group")) == NULL ||
            (obj_name_world = PyUnicode_InternFromString("world_rank")) == NULL ||
            (obj_name_set = PyUnicode_InternFromString("_set")) == NULL ||
            (obj_name_dumps = PyUnicode_InternFromString("_dumps")) == NULL ||
            (obj_name_protocol = PyUnicode_InternFromString("_protocol")) == NULL ||
            (obj_name_loads = PyUnicode_InternFromString("_loads")) == NULL ||
            (obj_any_source = PyLong_FromLong(-2)) == NULL)
            return NULL;
        for (int i = 0; i < 3; i++)
            if ((obj_kw_send[i] = PyUnicode_InternFromString(send_names[i])) == NULL)
                return NULL;
        for (int i = 0; i < 4; i++)
            if ((obj_kw_recv[i] = PyUnicode_InternFromString(recv_names[i])) == NULL)
                return NULL;
    }
    PyObject *fronts = PyTuple_New(OBJ_N);
    for (int i = 0; fronts != NULL && i < OBJ_N; i++) {
        if (obj_defs[i].ml_doc == NULL) { /* the Python method's, once (the def outlives it) */
            PyObject *doc = PyObject_GetAttrString(args[1 + 2 * i], "__doc__");
            const char *text = doc != NULL && PyUnicode_Check(doc) ? PyUnicode_AsUTF8(doc) : NULL;
            char *copy = text == NULL ? NULL : PyMem_RawMalloc(strlen(text) + 1);
            Py_XDECREF(doc);
            if (copy == NULL) {
                PyErr_Clear();
            } else {
                strcpy(copy, text);
                obj_defs[i].ml_doc = copy;
            }
        }
        PyObject *front = PyDescr_NewMethod((PyTypeObject *)args[0], &obj_defs[i]);
        if (front == NULL)
            Py_CLEAR(fronts);
        else
            PyTuple_SET_ITEM(fronts, i, front);
    }
    if (fronts == NULL)
        return NULL;
    for (int i = 0; i < OBJ_N; i++) {
        Py_XSETREF(obj_python_of[i], Py_NewRef(args[1 + 2 * i]));
        Py_XSETREF(obj_left_of[i], Py_NewRef(args[2 + 2 * i]));
    }
    Py_XSETREF(obj_pickle, Py_NewRef(args[7]));
    Py_XSETREF(obj_done, Py_NewRef(args[8]));
    return fronts;
}

/* ------------------------------------------------------------------------------------------
 * Module
 * ------------------------------------------------------------------------------------------ */

static PyObject *full_fence(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    full_fence_impl(); /* [F1]/[F2] for callers that order their own stores and loads */
    Py_RETURN_NONE;
}

/* compare_exchange_u64(buffer, offset, expected, desired) -> bool: one atomic
 * compare-and-swap of the aligned 8-byte word at `offset` of a writable shared mapping. On
 * x86-64 a LOCK CMPXCHG, atomic between every process and VM mapping the same memory: what
 * makes a peer-slot claim race-free without a broker. */
static PyObject *compare_exchange_u64(PyObject *Py_UNUSED(module), PyObject *const *args,
                                      Py_ssize_t nargs)
{
    long long offset;
    if (check_nargs("compare_exchange_u64", nargs, 4) < 0 || as_long_long(args[1], &offset) < 0)
        return NULL;
    unsigned long long expected = PyLong_AsUnsignedLongLong(args[2]);
    if (expected == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long desired = PyLong_AsUnsignedLongLong(args[3]);
    if (desired == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_WRITABLE) < 0)
        return NULL;
    if (offset < 0 || offset % 8 || offset > (long long)buf.len - 8) {
        PyErr_Format(PyExc_ValueError, "offset %lld is not an aligned word of a %zd-byte buffer",
                     offset, buf.len);
        PyBuffer_Release(&buf);
        return NULL;
    }
    uint64_t *word = (uint64_t *)((unsigned char *)buf.buf + offset);
    uint64_t seen = expected;
    bool swapped = __atomic_compare_exchange_n(word, &seen, (uint64_t)desired, false,
                                               __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&buf);
    return PyBool_FromLong(swapped);
}

/* The buffer formats flat_view takes a bare buffer of: native numeric types, as numpy and
 * the array module write them (a byte-order prefix or any other format: not taken). */
static const char *const flat_formats[] = {"?", "b", "B", "h", "H", "i", "I", "l", "L", "q",
                                           "Q", "e", "f", "d", "g", "Zf", "Zd", "Zg", NULL};

static bool flat_format(const char *format)
{
    if (format == NULL)
        return true; /* unsigned bytes */
    for (int i = 0; flat_formats[i] != NULL; i++) /* (first letters first: no call mostly) */
        if (format[0] == flat_formats[i][0] && strcmp(format, flat_formats[i]) == 0)
            return true;
    return false;
}

/* Make `view`, a memoryview just made by PyMemoryView_FromObject and seen by no one else yet,
 * over a C-contiguous buffer of one dimension or more, the view of its bytes that
 * view.cast("B") returns: the same fields (as CPython's cast_to_1D sets them: unsigned bytes,
 * one dimension of len items, stride 1, contiguous both ways), set in this memoryview's own
 * copy of the export, where cast makes a second memoryview (an allocation and a format parse:
 * ~40 ns of an Irecv of a float64 array or of (array('d'), MPI.DOUBLE), ~300 ns in all).
 * Its shape and strides (never NULL in a memoryview of ndim >= 1; checked by the caller) lie
 * in the view's own ob_array, with room for the exporter's ndim entries each; the managed buffer (the export, released with the view) keeps the
 * exporter's format. */
static void flat_bytes_in_place(PyObject *view)
{
    PyMemoryViewObject *mv = (PyMemoryViewObject *)view;
    Py_buffer *info = &mv->view;
    info->format = (char *)"B";
    info->itemsize = 1;
    info->ndim = 1;
    info->shape[0] = info->len;
    info->strides[0] = 1;
    info->suboffsets = NULL;
    mv->flags = _Py_MEMORYVIEW_C | _Py_MEMORYVIEW_FORTRAN;
}

/* Cut `view`, a byte memoryview of one dimension and stride 1 just made and seen by no one
 * else yet (flat_view's, flattened), to its first `bytes` bytes (0 <= bytes <= its len) in
 * place: the fields view[:bytes] gives its new memoryview (len and shape[0]: the start, the
 * stride, the format and the contiguous flags stay), where the slice makes a second
 * memoryview (~60 ns of every Irecv of [buf, count, datatype] over a longer buffer, the form
 * of mpi4py's own demo/osu_bw.py and osu_bibw.py). The shape lies in the view's own ob_array;
 * the managed buffer (the export, released with the view) keeps the exporter's len. */
static void flat_prefix_in_place(PyObject *view, Py_ssize_t bytes)
{
    Py_buffer *info = &((PyMemoryViewObject *)view)->view;
    info->len = bytes;
    info->shape[0] = bytes;
}

/* flat_view(spec, writable, sizes): the flat byte view of the message spec `spec` when it is
 * a list or tuple (buf, count, key) with an int count >= 0 or (buf, key), `sizes` (a dict)
 * gives the element size of key by id(key), and buf is a C-contiguous buffer (writable when
 * `writable`) holding count elements (all of it, whole elements, without a count); or when
 * `spec` is itself such a buffer, not empty, of a native numeric format (all of it): a
 * memoryview of exactly those bytes, cast to unsigned bytes. None for anything else, never an
 * error of the spec (the caller's full parse decides and reports those). The C side of
 * guest_lib.mpi.buffers.quick; its Python reference there (_flat_view_py) gives the same.
 * `sizes` set_front's own table (buffers._PLAIN_SIZE): looked up through its memo. */
static PyObject *flat_view(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("flat_view", nargs, 3) < 0)
        return NULL;
    PyObject *spec = args[0], *sizes = args[2];
    int writable = PyObject_IsTrue(args[1]);
    if (writable < 0)
        return NULL;
    if (!PyDict_Check(sizes)) {
        PyErr_SetString(PyExc_TypeError, "flat_view: sizes must be a dict");
        return NULL;
    }
    bool bare = !PyList_CheckExact(spec) && !PyTuple_CheckExact(spec);
    Py_ssize_t n = bare ? 1 : PySequence_Fast_GET_SIZE(spec);
    PyObject **items = bare ? &spec : PySequence_Fast_ITEMS(spec);
    long long count = -1, size = 1; /* all of the buffer */
    if (n == 3) {
        if (!PyLong_CheckExact(items[1]))
            Py_RETURN_NONE;
        count = PyLong_AsLongLong(items[1]);
        if (count == -1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                return NULL;
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        if (count < 0)
            Py_RETURN_NONE;
    } else if (n != 2 && !bare)
        Py_RETURN_NONE;
    PyObject *buf = items[0];
    if (!bare && sizes == front_sizes) { /* (buffers._PLAIN_SIZE: set_front's, memoized) */
        size = front_memo_lookup(front_memo_sizes, front_sizes, items[n - 1], false);
        if (size <= 0)
            return size < 0 && PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    } else if (!bare) {
        PyObject *key = PyLong_FromVoidPtr(items[n - 1]);
        if (key == NULL)
            return NULL;
        PyObject *size_obj = PyDict_GetItemWithError(sizes, key); /* borrowed */
        Py_DECREF(key);
        if (size_obj == NULL)
            return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
        size = PyLong_AsLongLong(size_obj);
        if (size <= 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "flat_view: sizes must be positive");
            return NULL;
        }
    }
    Py_INCREF(buf); /* (held while its exporter runs) */
    PyObject *view = PyMemoryView_FromObject(buf);
    Py_DECREF(buf);
    if (view == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError) && !PyErr_ExceptionMatches(PyExc_ValueError) &&
            !PyErr_ExceptionMatches(PyExc_BufferError))
            return NULL;
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    Py_buffer *info = PyMemoryView_GET_BUFFER(view);
    if ((writable && info->readonly) || !PyBuffer_IsContiguous(info, 'C') ||
        (bare && (info->len == 0 || !flat_format(info->format))))
        goto none;
    if (info->ndim != 1 || (info->format != NULL && strcmp(info->format, "B") != 0)) {
        if (info->len == 0 && info->ndim != 1) /* (cast fails: a 0 in a shape of 2 or more) */
            goto none;
        if (info->ndim >= 1 && info->shape != NULL && info->strides != NULL) {
            flat_bytes_in_place(view);
            goto flat;
        }
        static PyObject *cast_name, *byte_format; /* interned on first use */
        if (cast_name == NULL && (cast_name = PyUnicode_InternFromString("cast")) == NULL)
            goto fail;
        if (byte_format == NULL && (byte_format = PyUnicode_InternFromString("B")) == NULL)
            goto fail;
        PyObject *flat = PyObject_CallMethodOneArg(view, cast_name, byte_format);
        Py_DECREF(view);
        if (flat == NULL)
            return NULL;
        view = flat;
        info = PyMemoryView_GET_BUFFER(view);
    }
flat:;
    Py_ssize_t total = info->len;
    if (count < 0) {
        if (total % size)
            goto none;
        return view;
    }
    if (count > total / size)
        goto none;
    if (count * size < total)
        flat_prefix_in_place(view, (Py_ssize_t)(count * size));
    return view;
none:
    Py_DECREF(view);
    Py_RETURN_NONE;
fail:
    Py_DECREF(view);
    return NULL;
}

/* isend_post(buf, dest, tag, at): Isend's send of a plain spec written whole at once, in one
 * call, with `at` the tuple (lane, peer, ctx, sent) a communicator keeps for one destination
 * on shared memory (guest_lib.mpi.comm: Comm._isend_at): when `dest` is an int (not a
 * subclass: the key it was found by may be an equal float), lane.send(peer, ctx, tag, buf)
 * and, when that sent it, Request(sent, the lane's engine, None, None): the complete
 * request Isend returns. None (nothing sent) for anything else, for Isend's Python path to
 * decide; TypeError for an `at` of another shape; what lane.send or the request raise. */
static PyObject *isend_post(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("isend_post", nargs, 4) < 0)
        return NULL;
    PyObject *at = args[3];
    if (!PyTuple_CheckExact(at) || PyTuple_GET_SIZE(at) != 4 ||
        !PyObject_TypeCheck(PyTuple_GET_ITEM(at, 0), &P2PLaneType)) {
        PyErr_SetString(PyExc_TypeError, "isend_post: at must be (lane, peer, ctx, sent)");
        return NULL;
    }
    if (!PyLong_CheckExact(args[1]))
        Py_RETURN_NONE;
    P2PLane *lane = (P2PLane *)PyTuple_GET_ITEM(at, 0);
    PyObject *send[4] = {PyTuple_GET_ITEM(at, 1), PyTuple_GET_ITEM(at, 2), args[2], args[0]};
    PyObject *sent = lane_send(lane, send, 4);
    if (sent != Py_True) {
        if (sent == NULL)
            return NULL;
        Py_DECREF(sent);
        Py_RETURN_NONE;
    }
    Py_DECREF(sent);
    return p2preq_request(PyTuple_GET_ITEM(at, 3), lane->engine, Py_None, Py_None);
}

/* irecv_post(buf, source, tag, at): Irecv's post of a plain receive in one call, with `at` the
 * tuple (posted, ctx, src, peer, engine, rank_of, unexpected, count, service, sizes, tag_ub,
 * any_tag) a communicator keeps for one source (guest_lib.mpi.comm: Comm._irecv_at, made
 * where Irecv found the source's route posting with the engine, Route.post): when `source` is
 * an int (not a subclass: the key it was found by may be an equal float) and `tag` one in
 * 0..tag_ub or any_tag, the engine's `unexpected` list is empty, no other thread runs
 * (count() == service[0], as the P2PLane reads other_threads()) and flat_view(buf, True,
 * sizes) takes `buf`, post_recv(posted, that view, ctx, src, tag, peer, engine, rank_of,
 * None): the Request. None (nothing done) for anything else, for Irecv's Python path to
 * decide; TypeError for an `at` of another shape; what flat_view, count() or the post raise. */
enum {
    IR_POSTED, IR_CTX, IR_SRC, IR_PEER, IR_ENGINE, IR_RANK_OF, IR_UNEXPECTED, IR_COUNT,
    IR_SERVICE, IR_SIZES, IR_TAG_UB, IR_ANY_TAG, IR_N
};

static PyObject *irecv_post(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("irecv_post", nargs, 4) < 0)
        return NULL;
    PyObject *at = args[3], *tag = args[2];
    if (!PyTuple_CheckExact(at) || PyTuple_GET_SIZE(at) != IR_N ||
        !PyList_CheckExact(PyTuple_GET_ITEM(at, IR_UNEXPECTED)) ||
        !PyList_CheckExact(PyTuple_GET_ITEM(at, IR_SERVICE)) ||
        PyList_GET_SIZE(PyTuple_GET_ITEM(at, IR_SERVICE)) < 1) {
        PyErr_SetString(PyExc_TypeError, "irecv_post: at must be a tuple of 12 (see there)");
        return NULL;
    }
    long long value, tag_ub, any_tag;
    if (!PyLong_CheckExact(args[1]) || !PyLong_CheckExact(tag) || as_long_long(tag, &value) != 0 ||
        as_long_long(PyTuple_GET_ITEM(at, IR_TAG_UB), &tag_ub) != 0 ||
        as_long_long(PyTuple_GET_ITEM(at, IR_ANY_TAG), &any_tag) != 0) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    if (!((value >= 0 && value <= tag_ub) || value == any_tag) ||
        PyList_GET_SIZE(PyTuple_GET_ITEM(at, IR_UNEXPECTED)) != 0)
        Py_RETURN_NONE;
    PyObject *n = PyObject_CallNoArgs(PyTuple_GET_ITEM(at, IR_COUNT));
    if (n == NULL)
        return NULL;
    int threads =
        PyObject_RichCompareBool(n, PyList_GET_ITEM(PyTuple_GET_ITEM(at, IR_SERVICE), 0), Py_NE);
    Py_DECREF(n);
    if (threads != 0)
        return threads < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *view_args[3] = {args[0], Py_True, PyTuple_GET_ITEM(at, IR_SIZES)};
    PyObject *view = flat_view(module, view_args, 3);
    if (view == NULL || view == Py_None)
        return view;
    PyObject *request = p2preq_post(
        PyTuple_GET_ITEM(at, IR_POSTED), view, PyTuple_GET_ITEM(at, IR_CTX),
        PyTuple_GET_ITEM(at, IR_SRC), tag, PyTuple_GET_ITEM(at, IR_PEER),
        PyTuple_GET_ITEM(at, IR_ENGINE), PyTuple_GET_ITEM(at, IR_RANK_OF), Py_None);
    Py_DECREF(view);
    return request;
}

/* set_front(ndarray, in_place, sizes, folds, ops): front()'s tables (see there). */
static PyObject *set_front(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("set_front", nargs, 5) < 0)
        return NULL;
    if (!PyType_Check(args[0]) || !PyDict_Check(args[2]) || !PyDict_Check(args[3]) ||
        !PyDict_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "set_front(type, object, dict, dict, dict)");
        return NULL;
    }
    Py_XSETREF(front_ndarray, Py_NewRef(args[0]));
    Py_XSETREF(front_in_place, Py_NewRef(args[1]));
    Py_XSETREF(front_sizes, Py_NewRef(args[2]));
    Py_XSETREF(front_folds, Py_NewRef(args[3]));
    Py_XSETREF(front_ops, Py_NewRef(args[4]));
    memset(front_memo_sizes, 0, sizeof front_memo_sizes); /* (their keys: the old tables') */
    memset(front_memo_folds, 0, sizeof front_memo_folds);
    memset(front_memo_ops, 0, sizeof front_memo_ops);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"shared_copy_costs", shared_copy_costs, METH_NOARGS,
     "shared_copy_costs() -> (below_512k, from_512k), each ((plain, plain_before), (streaming, "
     "streaming_before)): this process's last two costs (TSC ticks per KiB + 1; 0: not "
     "measured yet) of each way of copying a message of that size into shared memory."},
    {"full_fence", full_fence, METH_NOARGS, "A full (sequentially consistent) memory barrier."},
    {"compare_exchange_u64", (PyCFunction)(void (*)(void))compare_exchange_u64, METH_FASTCALL,
     "compare_exchange_u64(buffer, offset, expected, desired): atomic CAS; True if swapped."},
    {"set_front", (PyCFunction)(void (*)(void))set_front, METH_FASTCALL,
     "set_front(ndarray, in_place, sizes, folds, ops): CollectiveRound.front's tables."},
    {"flat_view", (PyCFunction)(void (*)(void))flat_view, METH_FASTCALL,
     "flat_view(spec, writable, sizes): a plain message spec's flat byte view, or None."},
    {"isend_post", (PyCFunction)(void (*)(void))isend_post, METH_FASTCALL,
     "isend_post(buf, dest, tag, at): Isend's send written whole at once, in one call, or None."},
    {"irecv_post", (PyCFunction)(void (*)(void))irecv_post, METH_FASTCALL,
     "irecv_post(buf, source, tag, at): Irecv's post of a plain receive in one call, or None."},
    {"obj_methods", (PyCFunction)(void (*)(void))obj_methods, METH_FASTCALL,
     "obj_methods(cls, send, send_unsent, isend, isend_unsent, recv, recv_left, pickle, done): "
     "(send, isend, recv), the C fronts of the object send and receive methods of cls."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ivshmem_comm._fastpath",
    .m_doc = "C accelerator of ivshmem_comm.virtqueue: TxRing and RxRing, same names and "
             "behaviour as the pure-Python reference.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    PyObject *errors = PyImport_ImportModule("ivshmem_comm.errors");
    if (errors == NULL)
        return NULL;
    RingCorruptError = PyObject_GetAttrString(errors, "RingCorruptError");
    CollectiveTruncatedError = PyObject_GetAttrString(errors, "CollectiveTruncatedError");
    PeerLostError = PyObject_GetAttrString(errors, "PeerLostError");
    Py_DECREF(errors);
    if (RingCorruptError == NULL || CollectiveTruncatedError == NULL || PeerLostError == NULL)
        return NULL;
    if (PyType_Ready(&TxRingType) < 0 || PyType_Ready(&RxRingType) < 0 ||
        PyType_Ready(&CollRoundType) < 0 || PyType_Ready(&P2PLaneType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "TxRing", (PyObject *)&TxRingType) < 0 ||
        PyModule_AddObjectRef(m, "RxRing", (PyObject *)&RxRingType) < 0 ||
        PyModule_AddObjectRef(m, "CollectiveRound", (PyObject *)&CollRoundType) < 0 ||
        PyModule_AddObjectRef(m, "P2PLane", (PyObject *)&P2PLaneType) < 0 ||
        PyModule_AddIntConstant(m, "SEND_OK", SEND_OK) < 0 ||
        PyModule_AddIntConstant(m, "CACHE_WINDOW", CACHE_WINDOW) < 0 ||
        PyModule_AddIntConstant(m, "SEND_KICK", SEND_KICK) < 0 ||
        PyModule_AddIntConstant(m, "SEND_FULL", SEND_FULL) < 0 ||
        PyModule_AddIntConstant(m, "SEND_TOO_BIG", SEND_TOO_BIG) < 0 ||
        typepack_add_functions(m) < 0 || memexport_add_type(m) < 0 ||
        p2preq_add_functions(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
