// The `tta` operator library: `TORCH_LIBRARY(tta, m)` opens the namespace; each csrc/ops/<op>.cpp
// adds its schema with TORCH_LIBRARY_FRAGMENT and each backend file registers kernels with
// TORCH_LIBRARY_IMPL. `import tta._C` loads the shared object, which runs these registrations.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(tta, m) {
  (void)m;  // schemas live beside their op in csrc/ops/
}

extern "C" {
// An empty Python module: importing it is only a way to dlopen the library from Python.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
