/* ivshmem_comm._fastpath, part 3: MemoryExporter, a base type whose instances export the
 * memory of an object they hold through the buffer protocol; and EmptyExporter, a base type
 * whose instances export no memory at an address of their own (MPI.BOTTOM, MPI.IN_PLACE).
 *
 * Python 3.11 has no __buffer__ (PEP 688 is 3.12): a Python class can export memory only
 * through a C base type. guest_lib.mpi.win.Win derives from this one so that
 * memoryview(win), numpy.asarray(win) and mpi4py.util.sync see the window's local memory
 * as mpi4py's Win gives it: one-dimensional unsigned bytes ("B", itemsize 1) over the
 * window's base and size, writable.
 *
 * Compiled into the _fastpath module with _fastpath.c (whose module init calls
 * memexport_add_type); kept in its own file so the ring code and this code change apart.
 *
 * Ownership. `_exported` is the object whose memory is exported (a memoryview of the window
 * memory) or None. Each buffer handed out holds its own buffer of that object (acquired at
 * getbuffer, kept in view->internal, released at releasebuffer), so the memory stays valid
 * for the buffer's life whatever happens to `_exported`; and `_exported` cannot be changed
 * while buffers are out (BufferError), so a holder that clears it before giving the memory
 * back (Win.Free) learns that the memory is still in use. `_exports` counts the buffers
 * out. All of it runs under the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_memexport.h"

typedef struct {
    PyObject_HEAD
    PyObject *exported; /* whose memory is exported, or NULL */
    Py_ssize_t exports; /* buffers handed out and not released */
} MemoryExporter;

static int mx_getbuffer(MemoryExporter *self, Py_buffer *view, int flags)
{
    view->obj = NULL;
    if (self->exported == NULL) {
        PyErr_Format(PyExc_BufferError, "%s: no memory to export (a null handle)",
                     Py_TYPE(self)->tp_name);
        return -1;
    }
    Py_buffer *inner = PyMem_Malloc(sizeof *inner);
    if (inner == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    /* PyBUF_SIMPLE: contiguous bytes; writable only when the consumer asks for it. */
    if (PyObject_GetBuffer(self->exported, inner, PyBUF_SIMPLE | (flags & PyBUF_WRITABLE)) < 0) {
        PyMem_Free(inner);
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, inner->buf, inner->len, inner->readonly,
                          flags) < 0) {
        PyBuffer_Release(inner);
        PyMem_Free(inner);
        return -1;
    }
    view->internal = inner;
    self->exports++;
    return 0;
}

static void mx_releasebuffer(MemoryExporter *self, Py_buffer *view)
{
    Py_buffer *inner = view->internal;
    if (inner != NULL) {
        PyBuffer_Release(inner);
        PyMem_Free(inner);
        view->internal = NULL;
    }
    self->exports--;
}

static PyBufferProcs mx_as_buffer = {
    .bf_getbuffer = (getbufferproc)mx_getbuffer,
    .bf_releasebuffer = (releasebufferproc)mx_releasebuffer,
};

static PyObject *mx_get_exported(MemoryExporter *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->exported != NULL ? self->exported : Py_None);
}

static int mx_set_exported(MemoryExporter *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == Py_None)
        value = NULL;
    if (value == self->exported)
        return 0;
    if (self->exports > 0) {
        PyErr_Format(PyExc_BufferError,
                     "%s: its memory is still exported (%zd buffers: release every "
                     "memoryview / array made from it first)",
                     Py_TYPE(self)->tp_name, self->exports);
        return -1;
    }
    Py_XSETREF(self->exported, Py_XNewRef(value));
    return 0;
}

static PyObject *mx_get_exports(MemoryExporter *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->exports);
}

static PyGetSetDef mx_getset[] = {
    {"_exported", (getter)mx_get_exported, (setter)mx_set_exported,
     "the object whose memory buffers of this object give (None: none); BufferError on a "
     "change while buffers are exported",
     NULL},
    {"_exports", (getter)mx_get_exports, NULL, "the number of buffers exported and not released",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static int mx_traverse(MemoryExporter *self, visitproc visit, void *arg)
{
    Py_VISIT(self->exported);
    return 0;
}

static int mx_clear(MemoryExporter *self)
{
    Py_CLEAR(self->exported); /* buffers out hold their own buffer of it */
    return 0;
}

static void mx_dealloc(MemoryExporter *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    mx_clear(self);
    type->tp_free((PyObject *)self);
}

static PyTypeObject MemoryExporterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ivshmem_comm._fastpath.MemoryExporter",
    .tp_doc = "Base type: buffers of an instance are the memory of its `_exported` object "
              "(one-dimensional unsigned bytes), counted in `_exports`.",
    .tp_basicsize = sizeof(MemoryExporter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)mx_dealloc,
    .tp_traverse = (traverseproc)mx_traverse,
    .tp_clear = (inquiry)mx_clear,
    .tp_as_buffer = &mx_as_buffer,
    .tp_getset = mx_getset,
};

/* EmptyExporter. mpi4py's BOTTOM, IN_PLACE and BUFFER_AUTOMATIC export an empty buffer
 * (0 bytes, writable, format "B") at the address MPI gives the constant (MPI_BOTTOM,
 * MPI_IN_PLACE, ...), owned by no object: memoryview(MPI.BOTTOM).obj is None. The
 * constants of guest_lib.mpi.constants derive from this type and give that address as
 * int(): it is read at each export (the type's __int__, a C long: negative values are
 * addresses too, IN_PLACE's -1; TypeError for a type without __int__). No memory is behind
 * it and none is held: nothing to release. */
static int ee_getbuffer(PyObject *self, Py_buffer *view, int flags)
{
    view->obj = NULL;
    /* the type's __int__ itself: PyNumber_Long would read a bytes-like object (this one)
     * through its buffer, i.e. come back here */
    PyNumberMethods *number = Py_TYPE(self)->tp_as_number;
    if (number == NULL || number->nb_int == NULL) {
        PyErr_Format(PyExc_TypeError, "%s: no __int__ to give the buffer's address",
                     Py_TYPE(self)->tp_name);
        return -1;
    }
    PyObject *value = number->nb_int(self);
    if (value == NULL)
        return -1;
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "%s.__int__ returned %.200s, not int",
                     Py_TYPE(self)->tp_name, Py_TYPE(value)->tp_name);
        Py_DECREF(value);
        return -1;
    }
    void *address = PyLong_AsVoidPtr(value);
    Py_DECREF(value);
    if (address == NULL && PyErr_Occurred())
        return -1;
    return PyBuffer_FillInfo(view, NULL, address, 0, 0, flags);
}

static PyBufferProcs ee_as_buffer = {
    .bf_getbuffer = (getbufferproc)ee_getbuffer,
};

static PyTypeObject EmptyExporterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ivshmem_comm._fastpath.EmptyExporter",
    .tp_doc = "Base type: an instance exports an empty writable buffer at the address "
              "int(instance), owned by no object (memoryview(x).obj is None).",
    .tp_basicsize = sizeof(PyObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_as_buffer = &ee_as_buffer,
};

int memexport_add_type(PyObject *module)
{
    if (PyType_Ready(&MemoryExporterType) < 0 || PyType_Ready(&EmptyExporterType) < 0)
        return -1;
    if (PyModule_AddObjectRef(module, "MemoryExporter", (PyObject *)&MemoryExporterType) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "EmptyExporter", (PyObject *)&EmptyExporterType);
}
