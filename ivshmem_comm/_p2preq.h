/* ivshmem_comm._fastpath, part 4 (_p2preq.c): the MPI face's request objects in C. */
#ifndef IVSHMEM_COMM_P2PREQ_H
#define IVSHMEM_COMM_P2PREQ_H

#include <Python.h>

#include <stdbool.h>

/* Add p2p_types, new_request, post_recv, first_pending, null_done and copy_slots to the
 * module; 0 on success, -1 with an exception set. */
int p2preq_add_functions(PyObject *module);

/* Request(op, engine, rank_of, finish), as request_of makes it (new reference); NULL with an
 * exception (RuntimeError: the types not registered). The C side of ring.new_request and of
 * ring.isend_post (_fastpath.c). */
PyObject *p2preq_request(PyObject *op, PyObject *engine, PyObject *rank_of, PyObject *finish);

/* A RecvOp(ctx, src, tag, view, None, peer) appended to the list `posted`, and a Request on
 * it (request_of(op, engine, rank_of, finish)), returned (new reference); NULL with an
 * exception (TypeError: `posted` not a list, or the types not registered). The caller has
 * checked that the receive is to be queued as it is (matching.Matching.post's lone-thread
 * case). The C side of ring.post_recv and of ring.irecv_post (_fastpath.c). */
PyObject *p2preq_post(PyObject *posted, PyObject *view, PyObject *ctx, PyObject *src,
                      PyObject *tag, PyObject *peer, PyObject *engine, PyObject *rank_of,
                      PyObject *finish);

/* For the ring's take_posted (_fastpath.c), which matches messages to the MPI face's posted
 * receives: an entry of exactly the registered RecvOp type is read and written at its slots,
 * any other through getattr/setattr as before. */

/* What a posted receive takes, as take_posted sees it: nothing (a sink or an mpi side: the
 * layer above's), a message into its view (sink, mpi None, view not None), or a message as
 * bytes in its obj (an object receive: sink, mpi and view None). */
enum { POSTED_OTHER, POSTED_VIEW, POSTED_OBJECT };

/* The fields take_posted matches on, of a RecvOp `entry`: its ctx, src and want_tag, and
 * `form` (POSTED_*): 1; 0 when `entry` is not a registered RecvOp (nothing read); -1 with an
 * exception (a field unset or not an int). */
int p2preq_recv_fields(PyObject *entry, long long *ctx, long long *src, long long *want_tag,
                       int *form);

/* entry.view: a new reference, or NULL with an exception. */
PyObject *p2preq_recv_view(PyObject *entry);

/* Complete a RecvOp `entry`: source, tag, count = values[0..2], obj = `obj` unless NULL,
 * then done = True: 1; 0 when `entry` is not a registered RecvOp (nothing written). */
int p2preq_recv_done(PyObject *entry, PyObject *values[3], PyObject *obj);

#endif
