/* ivshmem_comm._fastpath, part 3 (_memexport.c): MemoryExporter, a base type that exports
 * another object's memory through the buffer protocol (MPI.Win's memoryview(win)). */
#ifndef IVSHMEM_COMM_MEMEXPORT_H
#define IVSHMEM_COMM_MEMEXPORT_H

#include <Python.h>

/* Add the MemoryExporter type to the module; 0 on success, -1 with an exception set. */
int memexport_add_type(PyObject *module);

#endif
