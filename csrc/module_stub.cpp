// rcd_ext._C holds no Python functions: its ops are registered with the torch dispatcher at
// load time (TORCH_LIBRARY). This stub only makes the shared library importable as a module,
// with the limited API so one build serves every supported Python.
#include <Python.h>

static struct PyModuleDef rcd_ext_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&rcd_ext_c_module); }
