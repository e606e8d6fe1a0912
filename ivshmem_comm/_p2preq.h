/* ivshmem_comm._fastpath, part 4 (_p2preq.c): the MPI face's request objects in C. */
#ifndef IVSHMEM_COMM_P2PREQ_H
#define IVSHMEM_COMM_P2PREQ_H

#include <Python.h>

/* Add p2p_types, new_request, post_recv and null_done to the module; 0 on success, -1 with
 * an exception set. */
int p2preq_add_functions(PyObject *module);

#endif
