// The Python module dlext._C. Importing it runs the static TORCH_LIBRARY registrations of every
// op in the library; the module itself only reports how this binary was built.
#include <Python.h>

#include "build_config.h"
#include "common/outputs.h"
#include "cross_entropy/cross_entropy_check.h"

namespace {

PyObject* build_info(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef DLEXT_WITH_CUDA
  PyObject* with_cuda = Py_True;
#else
  PyObject* with_cuda = Py_False;
#endif
  return Py_BuildValue("{s:s,s:O,s:s,s:s,s:s}", "torch_version", DLEXT_BUILD_TORCH_VERSION,
                       "with_cuda", with_cuda, "cuda_version", DLEXT_BUILD_CUDA_VERSION,
                       "cuda_archs", DLEXT_BUILD_CUDA_ARCHS, "cpu_capability",
                       DLEXT_BUILD_CPU_CAPABILITY);
}

PyObject* set_poison_outputs(PyObject* /*self*/, PyObject* arg) {
  const int enabled = PyObject_IsTrue(arg);
  if (enabled < 0) return nullptr;
  const bool previous = dlext::poison_outputs();
  dlext::set_poison_outputs(enabled != 0);
  return PyBool_FromLong(previous);
}

PyObject* set_cross_entropy_check_targets(PyObject* /*self*/, PyObject* arg) {
  const int enabled = PyObject_IsTrue(arg);
  if (enabled < 0) return nullptr;
  return PyBool_FromLong(dlext::set_cross_entropy_check_targets(enabled != 0));
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How this dlext binary was built."},
    {"set_poison_outputs", set_poison_outputs, METH_O,
     "Fill every new kernel output with NaN / all-ones bits first (for tests); returns the old "
     "setting."},
    {"set_cross_entropy_check_targets", set_cross_entropy_check_targets, METH_O,
     "Whether the CUDA cross_entropy operators raise on out-of-range class indices (a host "
     "synchronisation per call); returns the old setting."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "dlext's compiled operators", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
