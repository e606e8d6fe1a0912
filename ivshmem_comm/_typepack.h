/* ivshmem_comm._fastpath, part 2 (_typepack.c): pack/unpack of MPI derived datatypes. */
#ifndef IVSHMEM_COMM_TYPEPACK_H
#define IVSHMEM_COMM_TYPEPACK_H

#include <Python.h>

/* Add typed_copy to the module; 0 on success, -1 with an exception set. */
int typepack_add_functions(PyObject *module);

#endif
