// The kernels of flowstats.cpp as a CPython extension module (_flowstats), the way flowtrain calls them.
//
// Why not only ctypes: the microscope calls a kernel at every block boundary of a monitored step, between
// torch's ops, whose memory traffic has long evicted the call's code and data from the caches. Measured on a
// 2-core CPU after evicting the caches: an empty ctypes call costs ~20 us (argument conversion, libffi), the
// `.ctypes.data` of a numpy array ~24 us, building a pointer array with numpy ~25 us; a METH_FASTCALL call of
// this module ~5 us. With a dozen calls per monitored step that difference is most of the budget.
//
// Calling convention (the same for the ctypes fallback in __init__.py): every argument of a C function is
// passed positionally; integers as int, floating point as float, and every pointer as
//   None (NULL) | an int (an address) | a list/tuple of ints (an array of addresses, 0 for NULL, built here)
//   | a contiguous object with the buffer protocol (a numpy array: its data).
// one(), two() and logits() return their numbers as a tuple instead of writing them to memory.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdarg.h>

#include "flowstats.cpp"

namespace {

// What the converted arguments of one call borrow; released when the call returns.
struct Held {
  std::vector<std::vector<uintptr_t>> arrays;
  std::vector<Py_buffer> views;
  ~Held() {
    for (auto &v : views) PyBuffer_Release(&v);
  }
};

bool as_pointer(PyObject *o, void **out, Held &held) {
  if (o == Py_None) {
    *out = nullptr;
    return true;
  }
  if (PyLong_Check(o)) {
    *out = PyLong_AsVoidPtr(o);
    return !PyErr_Occurred();
  }
  if (PyList_Check(o) || PyTuple_Check(o)) {
    Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
    PyObject **items = PySequence_Fast_ITEMS(o);
    held.arrays.emplace_back(n > 0 ? n : 1, 0);
    std::vector<uintptr_t> &a = held.arrays.back();
    for (Py_ssize_t i = 0; i < n; i++) {
      if (items[i] == Py_None) continue;
      a[i] = (uintptr_t)PyLong_AsVoidPtr(items[i]);
      if (PyErr_Occurred()) return false;
    }
    *out = a.data();
    return true;
  }
  Py_buffer view;
  if (PyObject_GetBuffer(o, &view, PyBUF_ANY_CONTIGUOUS) != 0) return false;
  held.views.push_back(view);
  *out = view.buf;
  return true;
}

// Convert args by `format` (one letter per argument: i = int64, c = C int, d = double, p = pointer) into the
// pointed-to variables that follow it, in order.
bool parse(PyObject *const *args, Py_ssize_t nargs, const char *format, Held &held, ...) {
  Py_ssize_t want = (Py_ssize_t)strlen(format);
  if (nargs != want) {
    PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", want, nargs);
    return false;
  }
  va_list ap;
  va_start(ap, held);
  bool ok = true;
  for (Py_ssize_t i = 0; ok && i < want; i++) {
    PyObject *o = args[i];
    switch (format[i]) {
      case 'i':
        *va_arg(ap, int64_t *) = PyLong_AsLongLong(o);
        ok = !PyErr_Occurred();
        break;
      case 'c':
        *va_arg(ap, int *) = (int)PyLong_AsLong(o);
        ok = !PyErr_Occurred();
        break;
      case 'd':
        *va_arg(ap, double *) = PyFloat_AsDouble(o);
        ok = !PyErr_Occurred();
        break;
      default:
        ok = as_pointer(o, va_arg(ap, void **), held);
    }
  }
  va_end(ap);
  return ok;
}

#define FT_ARGS PyObject *, PyObject *const *a, Py_ssize_t n

PyObject *py_sumsq_maxabs(FT_ARGS) {
  Held h;
  int64_t count;
  void *ptrs, *numel, *sumsq, *maxabs;
  if (!parse(a, n, "ipppp", h, &count, &ptrs, &numel, &sumsq, &maxabs)) return nullptr;
  ft_sumsq_maxabs(count, (const float *const *)ptrs, (const int64_t *)numel, (double *)sumsq, (float *)maxabs);
  Py_RETURN_NONE;
}

PyObject *py_one(FT_ARGS) {  // (sum of squares, max |x|) of one tensor; max is NaN when the sum is
  Held h;
  void *p;
  int64_t count;
  if (!parse(a, n, "pi", h, &p, &count)) return nullptr;
  double out[2];
  ft_sumsq_maxabs1((const float *)p, count, out);
  return Py_BuildValue("(dd)", out[0], out[0] == out[0] ? out[1] : out[0]);
}

PyObject *py_two(FT_ARGS) {  // one() of two tensors in one call: (sum a^2, max |a|, sum b^2, max |b|)
  Held h;
  void *pa, *pb;
  int64_t na, nb;
  if (!parse(a, n, "pipi", h, &pa, &na, &pb, &nb)) return nullptr;
  double out[4];
  ft_sumsq_maxabs2((const float *)pa, na, (const float *)pb, nb, out);
  return Py_BuildValue("(dddd)", out[0], out[0] == out[0] ? out[1] : out[0], out[2], out[2] == out[2] ? out[3] : out[2]);
}

PyObject *py_nonfinite(FT_ARGS) {
  Held h;
  int64_t count;
  void *ptrs, *numel, *out;
  if (!parse(a, n, "ippp", h, &count, &ptrs, &numel, &out)) return nullptr;
  ft_nonfinite(count, (const float *const *)ptrs, (const int64_t *)numel, (int64_t *)out);
  Py_RETURN_NONE;
}

PyObject *py_sums(FT_ARGS) {
  Held h;
  int64_t count;
  void *ptrs, *numel, *out;
  if (!parse(a, n, "ippp", h, &count, &ptrs, &numel, &out)) return nullptr;
  ft_sums(count, (const float *const *)ptrs, (const int64_t *)numel, (double *)out);
  Py_RETURN_NONE;
}

PyObject *py_weights(FT_ARGS) {
  Held h;
  int64_t count;
  void *w, *snap, *numel, *out;
  if (!parse(a, n, "ipppp", h, &count, &w, &snap, &numel, &out)) return nullptr;
  ft_weights(count, (const float *const *)w, (float *const *)snap, (const int64_t *)numel, (double *)out);
  Py_RETURN_NONE;
}

PyObject *py_update(FT_ARGS) {
  Held h;
  int64_t count;
  void *w, *snap, *v, *numel, *out;
  int copy;
  if (!parse(a, n, "ipppppc", h, &count, &w, &snap, &v, &numel, &out, &copy)) return nullptr;
  ft_update(count, (const float *const *)w, (float *const *)snap, (const float *const *)v, (const int64_t *)numel,
            (double *)out, copy);
  Py_RETURN_NONE;
}

PyObject *py_logits(FT_ARGS) {  // (max |z|, sum over rows of log-sum-exp)
  Held h;
  void *z;
  int64_t rows, v;
  if (!parse(a, n, "pii", h, &z, &rows, &v)) return nullptr;
  double out[2];
  ft_logits((const float *)z, rows, v, out);
  return Py_BuildValue("(dd)", out[0], out[1]);
}

PyObject *py_attention(FT_ARGS) {
  Held h;
  int64_t count, nb, nh, t, s, d, p;
  void *q, *k, *qs, *ks, *rows, *out;
  int causal;
  double scale;
  if (!parse(a, n, "ippppiiiiipicdp", h, &count, &q, &k, &qs, &ks, &nb, &nh, &t, &s, &d, &rows, &p, &causal,
             &scale, &out))
    return nullptr;
  ft_attention(count, (const float *const *)q, (const float *const *)k, (const int64_t *)qs, (const int64_t *)ks, nb,
               nh, t, s, d, (const int64_t *)rows, p, causal, scale, (double *)out);
  Py_RETURN_NONE;
}

PyObject *py_adam_step(FT_ARGS) {
  Held h;
  int64_t count, vec;
  void *p, *g, *m, *v, *numel, *lr, *wd, *step, *out;
  double beta1, beta2, eps;
  int decoupled;
  if (!parse(a, n, "ippppppppdddcip", h, &count, &p, &g, &m, &v, &numel, &lr, &wd, &step, &beta1, &beta2, &eps,
             &decoupled, &vec, &out))
    return nullptr;
  ft_adam_step(count, (float *const *)p, (const float *const *)g, (float *const *)m, (float *const *)v,
               (const int64_t *)numel, (const double *)lr, (const double *)wd, (const double *)step, beta1, beta2,
               eps, decoupled, vec, (double *)out);
  Py_RETURN_NONE;
}

PyObject *py_flow_tables(FT_ARGS) {
  Held h;
  int64_t count, layers;
  void *gsq, *gmax, *bad, *wsq, *usq, *v_rms, *numel, *order, *starts, *tensors_out, *layers_out;
  if (!parse(a, n, "ipppppppipppp", h, &count, &gsq, &gmax, &bad, &wsq, &usq, &v_rms, &numel, &layers, &order,
             &starts, &tensors_out, &layers_out))
    return nullptr;
  ft_flow_tables(count, (const double *)gsq, (const double *)gmax, (const double *)bad, (const double *)wsq,
                 (const double *)usq, (const double *)v_rms, (const int64_t *)numel, layers, (const int64_t *)order,
                 (const int64_t *)starts, (float *)tensors_out, (float *)layers_out);
  Py_RETURN_NONE;
}

#define FT_METHOD(name) {#name, (PyCFunction)(void (*)(void))py_##name, METH_FASTCALL, nullptr}

PyMethodDef methods[] = {
    FT_METHOD(sumsq_maxabs), FT_METHOD(one),       FT_METHOD(two),       FT_METHOD(nonfinite), FT_METHOD(sums),
    FT_METHOD(weights),      FT_METHOD(update),    FT_METHOD(logits),    FT_METHOD(attention),
    FT_METHOD(adam_step),    FT_METHOD(flow_tables), {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_flowstats", "flowtrain's CPU kernels (flowstats.cpp)", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__flowstats(void) { return PyModule_Create(&module); }
