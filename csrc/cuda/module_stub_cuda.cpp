// rcd_ext._C_cuda only registers the CUDA kernel with the dispatcher (TORCH_LIBRARY_IMPL); this
// stub makes the shared library importable. Kept apart from rcd_ext._C so that a CUDA build
// still imports under a CPU-only torch.
#include <Python.h>

static struct PyModuleDef rcd_ext_c_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1,
                                                   nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&rcd_ext_c_cuda_module); }
