/* ivshmem_comm._fastpath, part 3 (_memexport.c): MemoryExporter, a base type that exports
 * another object's memory through the buffer protocol (MPI.Win's memoryview(win)), and
 * EmptyExporter, whose instances export an empty buffer at their int() (MPI.BOTTOM...). */
#ifndef IVSHMEM_COMM_MEMEXPORT_H
#define IVSHMEM_COMM_MEMEXPORT_H

#include <Python.h>

/* Add the MemoryExporter and EmptyExporter types to the module; 0 on success, -1 with an
 * exception set. */
int memexport_add_type(PyObject *module);

#endif
