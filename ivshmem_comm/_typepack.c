/* ivshmem_comm._fastpath, part 2: pack/unpack of MPI derived datatypes (typed_copy).
 *
 * Compiled into the _fastpath module with _fastpath.c (which calls typepack_add_functions
 * from its module init); kept in its own file so the ring code and this code change apart.
 * The Python reference of the same operation is guest_lib.mpi.datatypes._typed_copy_py: both
 * give the same bytes for the same arguments (tests/mpi/test_typepack.py checks it).
 *
 * A datatype's compiled type map is a flat array of int64 runs (offset, length, repeats,
 * stride) in type-map order: `repeats` pieces of `length` bytes at offset, offset + stride,
 * ... (guest_lib.mpi.datatypes builds and caches it, adjacent pieces merged, equal pieces at
 * a constant stride folded into one run: a vector type is one run). Element e of a message
 * of `count` elements starting at byte `start` of the user buffer has its pieces at
 * start + e * extent + offset (+ i * stride). Packed, the pieces lie back to back.
 *
 * Memory safety: every argument is checked before any byte moves: the map's lengths are
 * non-negative, every piece of every element lies inside the user buffer (the extreme
 * elements bound them all, as positions are linear in e), and at most the packed buffer's
 * length (and `limit`) of packed bytes is copied, so a length that came from a peer (the
 * byte count of a received message) can shorten the copy but never make it leave either
 * buffer. Arithmetic is overflow-checked, every sum included (a wrapped piece end, e.g.
 * offset INT64_MAX + length 1, once passed the bounds as a negative end).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "_typepack.h"

#define RELEASE_GIL_MIN (64 * 1024) /* bytes: copies this long run without the GIL */

/* `reps` pieces of `len` bytes, `stride` apart in `user` (from `at`), back to back in
 * `packed` (from `dst`); a constant-size loop for the common element sizes, which the
 * compiler turns into plain loads and stores. */
#define RUN_LOOP(LEN)                                                                        \
    for (int64_t i = 0; i < reps; i++, at += stride, dst += (LEN)) {                         \
        if (gather)                                                                          \
            memcpy(dst, user + at, (LEN));                                                   \
        else                                                                                 \
            memcpy(user + at, dst, (LEN));                                                   \
    }

static void copy_run(bool gather, unsigned char *user, int64_t at, int64_t len, int64_t reps,
                     int64_t stride, unsigned char *dst)
{
    switch (len) {
    case 4:
        RUN_LOOP(4)
        break;
    case 8:
        RUN_LOOP(8)
        break;
    case 16:
        RUN_LOOP(16)
        break;
    default:
        RUN_LOOP((size_t)len)
    }
}

/* Copy up to `budget` packed bytes between `user` and `packed` (gather: user -> packed).
 * Arguments are validated by the caller (every byte touched lies inside both buffers).
 * Returns the bytes copied. */
static int64_t copy_all(bool gather, unsigned char *user, int64_t start, int64_t count,
                        int64_t extent, const int64_t *map, Py_ssize_t runs,
                        unsigned char *packed, int64_t budget)
{
    int64_t done = 0;
    for (int64_t e = 0; e < count && done < budget; e++) {
        int64_t base = start + e * extent;
        for (Py_ssize_t k = 0; k < runs && done < budget; k++) {
            /* a run: offset, length, repeats, stride (read into locals once) */
            int64_t at = base + map[4 * k], len = map[4 * k + 1], reps = map[4 * k + 2];
            int64_t stride = map[4 * k + 3];
            if (len == 0)
                continue;
            int64_t whole = (budget - done) / len; /* pieces that fit the budget whole */
            if (whole > reps)
                whole = reps;
            copy_run(gather, user, at, len, whole, stride, packed + done);
            done += whole * len;
            if (whole < reps && done < budget) { /* the budget ends inside this piece */
                int64_t tail = budget - done;
                copy_run(gather, user, at + whole * stride, tail, 1, 0, packed + done);
                done += tail;
            }
        }
    }
    return done;
}

/* typed_copy(gather, user, start, count, extent, runs, packed, limit) -> int
 *
 * gather true: the pieces of `count` elements in `user` (readable) are copied back to back
 * into `packed` (writable); false: `packed` (readable) is scattered into `user` (writable).
 * At most min(limit, len(packed), count * size) packed bytes move (limit < 0: no limit), a
 * partial last piece included. Returns the number of packed bytes copied. ValueError (and
 * nothing copied) for a map that is not int64 runs with lengths >= 0 and repeats >= 1, a
 * negative count, or an element that lies outside `user`. */
static PyObject *typed_copy(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError, "typed_copy() takes exactly 8 arguments (%zd given)",
                     nargs);
        return NULL;
    }
    int gather = PyObject_IsTrue(args[0]);
    if (gather < 0)
        return NULL;
    long long start = PyLong_AsLongLong(args[2]);
    long long count = PyLong_AsLongLong(args[3]);
    long long extent = PyLong_AsLongLong(args[4]);
    long long limit = PyLong_AsLongLong(args[7]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer user, map, packed;
    if (PyObject_GetBuffer(args[1], &user, gather ? PyBUF_SIMPLE : PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[5], &map, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&user);
        return NULL;
    }
    if (PyObject_GetBuffer(args[6], &packed, gather ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&user);
        PyBuffer_Release(&map);
        return NULL;
    }
    PyObject *result = NULL;
    const int64_t *runs = (const int64_t *)map.buf;
    Py_ssize_t nruns = map.len / 32;
    int64_t size = 0, low = 0, high = 0; /* data bytes of one element; span of its pieces */
    bool seen = false;                     /* a non-empty run was met */
    if (map.len % 32 || ((uintptr_t)map.buf % _Alignof(int64_t))) {
        PyErr_SetString(PyExc_ValueError, "typed_copy: the map is not aligned int64 runs");
        goto done;
    }
    if (count < 0) {
        PyErr_Format(PyExc_ValueError, "typed_copy: count %lld < 0", count);
        goto done;
    }
    for (Py_ssize_t k = 0; k < nruns; k++) {
        const int64_t *run = runs + 4 * k;
        int64_t off = run[0], len = run[1], reps = run[2], stride = run[3];
        int64_t span, bytes, first, end, last;
        if (len < 0 || reps < 1 || __builtin_mul_overflow(reps - 1, stride, &span) ||
            __builtin_mul_overflow(reps, len, &bytes) ||
            __builtin_add_overflow(size, bytes, &size) ||
            __builtin_add_overflow(off, span < 0 ? span : 0, &first) ||
            __builtin_add_overflow(off, len, &end) ||
            __builtin_add_overflow(end, span > 0 ? span : 0, &last)) {
            PyErr_Format(PyExc_ValueError, "typed_copy: bad map run (%lld, %lld, %lld, %lld)",
                         (long long)off, (long long)len, (long long)reps, (long long)stride);
            goto done;
        }
        if (len == 0)
            continue;
        low = (!seen || first < low) ? first : low;
        high = (!seen || last > high) ? last : high;
        seen = true;
    }
    int64_t budget = (limit < 0 || limit > (long long)packed.len) ? (int64_t)packed.len : limit;
    int64_t total;
    if (__builtin_mul_overflow((int64_t)count, size, &total))
        total = INT64_MAX;
    if (budget > total)
        budget = total;
    if (budget > 0) {
        /* every piece of the elements that are touched lies in [first, last) of `user`:
         * positions are linear in the element number, so the extreme elements bound them */
        int64_t touched = size ? (budget + size - 1) / size : 0, span, lo, hi, first, last;
        bool bad = __builtin_mul_overflow(touched - 1, (int64_t)extent, &span) ||
                   __builtin_add_overflow(low, span < 0 ? span : 0, &lo) ||
                   __builtin_add_overflow(high, span > 0 ? span : 0, &hi) ||
                   __builtin_add_overflow((int64_t)start, lo, &first) ||
                   __builtin_add_overflow((int64_t)start, hi, &last);
        if (bad || first < 0 || last > (int64_t)user.len) {
            PyErr_Format(PyExc_ValueError,
                         "typed_copy: %lld elements (extent %lld) at byte %lld run past a "
                         "%zd-byte buffer",
                         (long long)touched, extent, start, user.len);
            goto done;
        }
    }
    int64_t copied;
    if (budget >= RELEASE_GIL_MIN) {
        Py_BEGIN_ALLOW_THREADS
        copied = copy_all(gather, user.buf, start, count, extent, runs, nruns, packed.buf,
                          budget);
        Py_END_ALLOW_THREADS
    } else {
        copied = budget > 0 ? copy_all(gather, user.buf, start, count, extent, runs, nruns,
                                       packed.buf, budget)
                            : 0;
    }
    result = PyLong_FromLongLong(copied);
done:
    PyBuffer_Release(&user);
    PyBuffer_Release(&map);
    PyBuffer_Release(&packed);
    return result;
}

static PyMethodDef typepack_methods[] = {
    {"typed_copy", (PyCFunction)(void (*)(void))typed_copy, METH_FASTCALL,
     "typed_copy(gather, user, start, count, extent, runs, packed, limit) -> bytes copied: "
     "pack (gather) or unpack elements of a derived datatype by its compiled map."},
    {NULL, NULL, 0, NULL},
};

int typepack_add_functions(PyObject *module)
{
    return PyModule_AddFunctions(module, typepack_methods);
}
