/* ivshmem_comm._fastpath, part 4: the per-message objects of the MPI face's nonblocking
 * point-to-point calls (guest_lib.mpi: Request, RecvOp), made and read in C.
 *
 * Compiled into the _fastpath module with _fastpath.c (which calls p2preq_add_functions from
 * its module init). The MPI face hands its classes over once (p2p_types); the functions
 * here then set and read their __slots__ straight at the offsets of the slots' member
 * descriptors, as the interpreter's own slot access does, instead of one attribute lookup
 * per field. Each function has its Python reference in guest_lib.mpi (request_of,
 * _null_done, Irecv's post), which gives the same objects and results; the MPI face uses
 * these only on the C path.
 *
 * Layout safety: an offset is taken only from a member descriptor of an object slot
 * (T_OBJECT_EX) defined by the registered class or one of its bases, found by the type's
 * own lookup (a property or any other descriptor of that name refuses the registration).
 * An object is written or read at those offsets only when its type is exactly the
 * registered class, or (an Op's done/error/cancelled) when the type's lookup of each of the
 * three names finds the very descriptor registered: an Op subclass that redefines one (a
 * property) is read through getattr, as Python reads it. copy_slots (a template's copy)
 * needs no registration: it copies the slots its object's own type defines.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <stdbool.h>

#include "_p2preq.h"

enum { R_CELL, R_ENGINE, R_FINISH, R_OP, R_OWNER, R_RANK_OF, R_N };
static const char *const request_text[R_N] = {"_cell",  "_engine", "_finish",
                                              "_op",    "_owner",  "_rank_of"};

/* RecvOp's slots: the first O_SET are given per receive, the rest are copied from the
 * template RecvOp given to p2p_types (RecvOp.__init__'s values; mpi_world's is the empty
 * tuple, immutable, so one object serves every receive). */
enum {
    O_CTX, O_SRC, O_WANT_TAG, O_VIEW, O_PEER, O_SET, O_MPI_WORLD = O_SET,
    O_DONE, O_ERROR, O_CANCELLED, O_TAG, O_SOURCE, O_COUNT, O_OBJ, O_SINK, O_PARTS, O_MPI,
    O_MPI_SRC, O_N
}; /* (O_DONE..O_CANCELLED: Op's, read by null_done on any Op) */
static const char *const recv_text[O_N] = {
    "ctx",  "src",   "want_tag",  "view", "peer",   "mpi_world", "done", "error", "cancelled",
    "tag",  "source", "count",    "obj",  "sink",   "parts",     "mpi",  "mpi_src"};

static PyTypeObject *request_type, *recv_type; /* registered by p2p_types; NULL before */
static Py_ssize_t request_off[R_N], recv_off[O_N];
static PyObject *recv_default[O_N]; /* the template's values (from O_SET on) */
static PyObject *op_descr[3];       /* the descriptors of done, error, cancelled */
static PyObject *op_name[3];        /* their names, interned */

/* Op types whose done/error/cancelled are the registered slots (checked once each). */
#define KNOWN_OPS 16
static PyTypeObject *known_op[KNOWN_OPS];
static int known_ops;

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

/* Set slot `off` of `obj` to a new reference to `value`. */
static inline void slot_set(PyObject *obj, Py_ssize_t off, PyObject *value)
{
    Py_XSETREF(SLOT(obj, off), Py_NewRef(value));
}

/* The offset of object slot `name` of `type` into *off (and its descriptor into *descr,
 * borrowed): 0, or -1 with TypeError when the type's lookup finds no such slot. */
static int slot_offset(PyTypeObject *type, const char *name, Py_ssize_t *off, PyObject **descr)
{
    PyObject *key = PyUnicode_InternFromString(name);
    if (key == NULL)
        return -1;
    PyObject *found = _PyType_Lookup(type, key); /* borrowed */
    Py_DECREF(key);
    if (found == NULL || !Py_IS_TYPE(found, &PyMemberDescr_Type) ||
        ((PyMemberDescrObject *)found)->d_member->type != T_OBJECT_EX ||
        (((PyMemberDescrObject *)found)->d_member->flags & READONLY) ||
        !PyType_IsSubtype(type, PyDescr_TYPE(found))) {
        PyErr_Format(PyExc_TypeError, "p2p_types: %s.%s is not an object slot", type->tp_name,
                     name);
        return -1;
    }
    *off = ((PyMemberDescrObject *)found)->d_member->offset;
    if (descr != NULL)
        *descr = found;
    return 0;
}

/* p2p_types(Request, RecvOp, template): register the classes (see the file's comment);
 * `template` is a RecvOp whose field values new receives copy. TypeError for a class
 * without the slots named above (nothing registered then). */
static PyObject *p2p_types(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyType_Check(args[0]) || !PyType_Check(args[1]) ||
        !Py_IS_TYPE(args[2], (PyTypeObject *)args[1])) {
        PyErr_SetString(PyExc_TypeError, "p2p_types(Request, RecvOp, a RecvOp)");
        return NULL;
    }
    PyTypeObject *request = (PyTypeObject *)args[0], *recv = (PyTypeObject *)args[1];
    Py_ssize_t roff[R_N], ooff[O_N];
    PyObject *descr[O_N], *values[O_N];
    for (int i = 0; i < R_N; i++)
        if (slot_offset(request, request_text[i], &roff[i], NULL) < 0)
            return NULL;
    for (int i = 0; i < O_N; i++)
        if (slot_offset(recv, recv_text[i], &ooff[i], &descr[i]) < 0)
            return NULL;
    for (int i = O_SET; i < O_N; i++) {
        values[i] = SLOT(args[2], ooff[i]);
        if (values[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "p2p_types: the template has no %s", recv_text[i]);
            return NULL;
        }
    }
    for (int i = 0; i < 3; i++)
        if (op_name[i] == NULL &&
            (op_name[i] = PyUnicode_InternFromString(recv_text[O_DONE + i])) == NULL)
            return NULL;
    Py_XSETREF(request_type, (PyTypeObject *)Py_NewRef(request));
    Py_XSETREF(recv_type, (PyTypeObject *)Py_NewRef(recv));
    memcpy(request_off, roff, sizeof roff);
    memcpy(recv_off, ooff, sizeof ooff);
    for (int i = O_SET; i < O_N; i++)
        Py_XSETREF(recv_default[i], Py_NewRef(values[i]));
    for (int i = 0; i < 3; i++)
        Py_XSETREF(op_descr[i], Py_NewRef(descr[O_DONE + i]));
    for (int i = 0; i < known_ops; i++)
        Py_CLEAR(known_op[i]);
    known_ops = 0;
    Py_RETURN_NONE;
}

static int check_registered(const char *call)
{
    if (request_type != NULL)
        return 0;
    PyErr_Format(PyExc_RuntimeError, "%s: p2p_types was not called", call);
    return -1;
}

/* A new Request on `op` (all six fields set, _cell and _owner None); NULL with an error. */
static PyObject *make_request(PyObject *op, PyObject *engine, PyObject *rank_of, PyObject *finish)
{
    PyObject *request = request_type->tp_alloc(request_type, 0);
    if (request == NULL)
        return NULL;
    slot_set(request, request_off[R_CELL], Py_None);
    slot_set(request, request_off[R_OWNER], Py_None);
    slot_set(request, request_off[R_OP], op);
    slot_set(request, request_off[R_ENGINE], engine);
    slot_set(request, request_off[R_RANK_OF], rank_of);
    slot_set(request, request_off[R_FINISH], finish);
    return request;
}

/* new_request(op, engine, rank_of, finish): Request(op, engine, rank_of, finish), as
 * guest_lib.mpi.request.request_of makes it. */
static PyObject *new_request(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "new_request takes 4 arguments");
        return NULL;
    }
    return p2preq_request(args[0], args[1], args[2], args[3]);
}

PyObject *p2preq_request(PyObject *op, PyObject *engine, PyObject *rank_of, PyObject *finish)
{
    if (check_registered("new_request") < 0)
        return NULL;
    return make_request(op, engine, rank_of, finish);
}

PyObject *p2preq_post(PyObject *posted, PyObject *view, PyObject *ctx, PyObject *src,
                      PyObject *tag, PyObject *peer, PyObject *engine, PyObject *rank_of,
                      PyObject *finish)
{
    if (check_registered("post_recv") < 0)
        return NULL;
    if (!PyList_CheckExact(posted)) {
        PyErr_SetString(PyExc_TypeError, "post_recv: posted must be a list");
        return NULL;
    }
    PyObject *op = recv_type->tp_alloc(recv_type, 0);
    if (op == NULL)
        return NULL;
    slot_set(op, recv_off[O_CTX], ctx);
    slot_set(op, recv_off[O_SRC], src);
    slot_set(op, recv_off[O_WANT_TAG], tag);
    slot_set(op, recv_off[O_VIEW], view);
    slot_set(op, recv_off[O_PEER], peer);
    for (int i = O_SET; i < O_N; i++)
        slot_set(op, recv_off[i], recv_default[i]);
    PyObject *request = make_request(op, engine, rank_of, finish);
    if (request == NULL || PyList_Append(posted, op) < 0) {
        Py_XDECREF(request);
        Py_DECREF(op);
        return NULL;
    }
    Py_DECREF(op);
    return request;
}

/* post_recv(posted, view, ctx, src, tag, peer, engine, rank_of, finish): p2preq_post. */
static PyObject *post_recv(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "post_recv takes 9 arguments");
        return NULL;
    }
    return p2preq_post(args[0], args[1], args[2], args[3], args[4], args[5], args[6], args[7],
                       args[8]);
}

/* Whether the type of `op` reads done/error/cancelled from the registered slots: 1 or 0. */
static int plain_op(PyTypeObject *type)
{
    for (int i = 0; i < known_ops; i++)
        if (known_op[i] == type)
            return 1;
    for (int i = 0; i < 3; i++) /* (the descriptor alone could sit on an unrelated class) */
        if (_PyType_Lookup(type, op_name[i]) != op_descr[i] ||
            !PyType_IsSubtype(type, PyDescr_TYPE(op_descr[i])))
            return 0;
    if (known_ops < KNOWN_OPS)
        known_op[known_ops++] = (PyTypeObject *)Py_NewRef(type);
    return 1;
}

/* Field i (0 done, 1 error, 2 cancelled) of `op`, as a truth value: 1 or 0, -1 with an
 * error (a slot not set, or what getattr raised). */
static int op_flag(PyObject *op, bool plain, int i)
{
    if (plain) {
        PyObject *value = SLOT(op, recv_off[O_DONE + i]);
        if (value == Py_True)
            return 1;
        if (value == Py_False)
            return 0;
        if (value == NULL) {
            PyErr_SetObject(PyExc_AttributeError, op_name[i]);
            return -1;
        }
        return PyObject_IsTrue(value);
    }
    PyObject *value = PyObject_GetAttr(op, op_name[i]);
    if (value == NULL)
        return -1;
    int truth = PyObject_IsTrue(value);
    Py_DECREF(value);
    return truth;
}

/* Whether `request` (of the registered Request type) completed plainly: 1, 0, -1 with an
 * error. The order of the reads is _null_done's. */
static int done_plainly(PyObject *request)
{
    PyObject *op = SLOT(request, request_off[R_OP]);
    if (op == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_op");
        return -1;
    }
    if (op == Py_None)
        return 1;
    Py_INCREF(op); /* (a getattr below may run code) */
    bool plain = plain_op(Py_TYPE(op));
    int ok = op_flag(op, plain, 0);
    if (ok > 0) {
        PyObject *finish = SLOT(request, request_off[R_FINISH]);
        PyObject *cell = SLOT(request, request_off[R_CELL]);
        if (finish == NULL || cell == NULL) {
            PyErr_SetString(PyExc_AttributeError, finish == NULL ? "_finish" : "_cell");
            ok = -1;
        } else
            ok = finish == Py_None && cell == Py_None;
    }
    for (int i = 1; i < 3 && ok > 0; i++) {
        int flag = op_flag(op, plain, i);
        ok = flag < 0 ? -1 : !flag;
    }
    Py_DECREF(op);
    return ok;
}

/* null_done(requests): guest_lib.mpi.request._null_done(requests, Request): True iff
 * `requests` is a list or tuple whose every item is null or of exactly the Request type
 * with no _finish and no _cell, its op done without error and not cancelled; every one is
 * then made null (_op None). False: nothing changed. Errors of the reads raise as there. */
static PyObject *null_done(PyObject *Py_UNUSED(module), PyObject *requests)
{
    if (check_registered("null_done") < 0)
        return NULL;
    if (!PyList_CheckExact(requests) && !PyTuple_CheckExact(requests))
        Py_RETURN_FALSE;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(requests); i++) {
        PyObject *request = PySequence_Fast_GET_ITEM(requests, i);
        if (!Py_IS_TYPE(request, request_type))
            Py_RETURN_FALSE;
        Py_INCREF(request);
        int ok = done_plainly(request);
        Py_DECREF(request);
        if (ok < 0)
            return NULL;
        if (!ok)
            Py_RETURN_FALSE;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(requests); i++) {
        PyObject *request = PySequence_Fast_GET_ITEM(requests, i);
        if (Py_IS_TYPE(request, request_type)) /* (a list changed by a getattr above) */
            slot_set(request, request_off[R_OP], Py_None);
    }
    Py_RETURN_TRUE;
}

/* The object in slot i of RecvOp `entry` (borrowed), or NULL with AttributeError. */
static PyObject *recv_slot(PyObject *entry, int i)
{
    PyObject *value = SLOT(entry, recv_off[i]);
    if (value == NULL)
        PyErr_SetString(PyExc_AttributeError, recv_text[i]);
    return value;
}

int p2preq_recv_fields(PyObject *entry, long long *ctx, long long *src, long long *want_tag,
                       int *form)
{
    if (recv_type == NULL || !Py_IS_TYPE(entry, recv_type))
        return 0;
    const int ints[3] = {O_CTX, O_SRC, O_WANT_TAG};
    long long *out[3] = {ctx, src, want_tag};
    for (int k = 0; k < 3; k++) {
        PyObject *value = recv_slot(entry, ints[k]);
        if (value == NULL)
            return -1;
        *out[k] = PyLong_AsLongLong(value);
        if (*out[k] == -1 && PyErr_Occurred())
            return -1;
    }
    PyObject *sink = recv_slot(entry, O_SINK), *mpi = recv_slot(entry, O_MPI);
    PyObject *view = recv_slot(entry, O_VIEW);
    if (sink == NULL || mpi == NULL || view == NULL)
        return -1;
    *form = sink != Py_None || mpi != Py_None ? POSTED_OTHER
            : view == Py_None                   ? POSTED_OBJECT
                                                : POSTED_VIEW;
    return 1;
}

PyObject *p2preq_recv_view(PyObject *entry)
{
    if (recv_type == NULL || !Py_IS_TYPE(entry, recv_type))
        return PyObject_GetAttrString(entry, "view");
    PyObject *view = recv_slot(entry, O_VIEW);
    return view == NULL ? NULL : Py_NewRef(view);
}

int p2preq_recv_done(PyObject *entry, PyObject *values[3], PyObject *obj)
{
    if (recv_type == NULL || !Py_IS_TYPE(entry, recv_type))
        return 0;
    const int fields[3] = {O_SOURCE, O_TAG, O_COUNT};
    for (int k = 0; k < 3; k++)
        slot_set(entry, recv_off[fields[k]], values[k]);
    if (obj != NULL)
        slot_set(entry, recv_off[O_OBJ], obj);
    slot_set(entry, recv_off[O_DONE], Py_True);
    return 1;
}

/* first_pending(requests, start): the index of the first item of `requests` (a list or
 * tuple) from `start` on whose _op is not None and not done, len(requests) if none: as
 * guest_lib.mpi.request._first_pending_py (an exact Request read at its slot, any other item
 * by getattr; done as null_done reads it). Errors of the reads raise. */
static PyObject *first_pending(PyObject *Py_UNUSED(module), PyObject *const *args,
                               Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "first_pending takes 2 arguments");
        return NULL;
    }
    if (check_registered("first_pending") < 0)
        return NULL;
    PyObject *requests = args[0];
    if (!PyList_CheckExact(requests) && !PyTuple_CheckExact(requests)) {
        PyErr_SetString(PyExc_TypeError, "first_pending: requests must be a list or tuple");
        return NULL;
    }
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    for (i = i < 0 ? 0 : i; i < PySequence_Fast_GET_SIZE(requests); i++) {
        PyObject *request = PySequence_Fast_GET_ITEM(requests, i), *op;
        if (Py_IS_TYPE(request, request_type)) {
            op = SLOT(request, request_off[R_OP]);
            if (op == NULL) {
                PyErr_SetString(PyExc_AttributeError, "_op");
                return NULL;
            }
            Py_INCREF(op);
        } else if ((op = PyObject_GetAttrString(request, "_op")) == NULL)
            return NULL;
        int done = op == Py_None ? 1 : op_flag(op, plain_op(Py_TYPE(op)), 0);
        Py_DECREF(op);
        if (done < 0)
            return NULL;
        if (!done)
            return PyLong_FromSsize_t(i);
    }
    return PyLong_FromSsize_t(PySequence_Fast_GET_SIZE(requests));
}

/* copy_slots(obj): a new object of obj's exact type (a class defined in Python) whose object
 * slots (__slots__ of every Python class in its MRO) hold what obj's hold, an unset one
 * unset; no __init__ call, no __dict__ (a new, empty one where the type has one). The C
 * side of a template's copy: one call instead of object.__new__ and a store per field, for
 * objects made per call with the same fields but a few (the MPI face's started collective
 * rounds and their requests). TypeError for an object of a static type. */
static PyObject *copy_slots(PyObject *Py_UNUSED(module), PyObject *obj)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (!(type->tp_flags & Py_TPFLAGS_HEAPTYPE) || type->tp_alloc == NULL) {
        PyErr_Format(PyExc_TypeError, "copy_slots: %s is not a class defined in Python",
                     type->tp_name);
        return NULL;
    }
    PyObject *copy = type->tp_alloc(type, 0);
    if (copy == NULL)
        return NULL;
    PyObject *mro = type->tp_mro;
    for (Py_ssize_t i = 0; mro != NULL && i < PyTuple_GET_SIZE(mro); i++) {
        PyTypeObject *base = (PyTypeObject *)PyTuple_GET_ITEM(mro, i);
        if (!(base->tp_flags & Py_TPFLAGS_HEAPTYPE) || base->tp_members == NULL)
            continue;
        for (PyMemberDef *m = base->tp_members; m->name != NULL; m++)
            if (m->type == T_OBJECT_EX && !(m->flags & READONLY))
                Py_XSETREF(SLOT(copy, m->offset), Py_XNewRef(SLOT(obj, m->offset)));
    }
    return copy;
}

static PyMethodDef p2preq_methods[] = {
    {"p2p_types", (PyCFunction)(void (*)(void))p2p_types, METH_FASTCALL,
     "p2p_types(Request, RecvOp, template): the MPI face's request classes."},
    {"new_request", (PyCFunction)(void (*)(void))new_request, METH_FASTCALL,
     "new_request(op, engine, rank_of, finish): a Request on op, as request_of."},
    {"post_recv", (PyCFunction)(void (*)(void))post_recv, METH_FASTCALL,
     "post_recv(posted, view, ctx, src, tag, peer, engine, rank_of, finish): a receive posted."},
    {"first_pending", (PyCFunction)(void (*)(void))first_pending, METH_FASTCALL,
     "first_pending(requests, start): the first request from start not complete."},
    {"null_done", (PyCFunction)null_done, METH_O,
     "null_done(requests): Waitall's pass over plainly completed requests."},
    {"copy_slots", (PyCFunction)copy_slots, METH_O,
     "copy_slots(obj): a new object of obj's class with the values of obj's slots."},
    {NULL, NULL, 0, NULL},
};

int p2preq_add_functions(PyObject *module)
{
    return PyModule_AddFunctions(module, p2preq_methods);
}
