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

#include <string.h>

#include <vector>

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

// -- reading torch tensors from here -------------------------------------------------------------------------
// Between torch's ops the microscope's Python runs with cold caches, where each attribute read of a tensor costs
// about a microsecond; asking them from C, in one call for a whole list, costs a fraction of that. Only the
// tensors' public Python attributes are read (no torch headers): exact type, dtype, is_cpu, is_contiguous(),
// data_ptr(), numel().

PyObject *s_grad, *s_dtype, *s_is_cpu, *s_is_contiguous, *s_data_ptr, *s_numel;  // interned names

bool intern_names() {
  if (s_grad) return true;
  s_grad = PyUnicode_InternFromString("grad");
  s_dtype = PyUnicode_InternFromString("dtype");
  s_is_cpu = PyUnicode_InternFromString("is_cpu");
  s_is_contiguous = PyUnicode_InternFromString("is_contiguous");
  s_data_ptr = PyUnicode_InternFromString("data_ptr");
  s_numel = PyUnicode_InternFromString("numel");
  return s_grad && s_dtype && s_is_cpu && s_is_contiguous && s_data_ptr && s_numel;
}

// 1: t.name (t.name() when `call`) is the object `want`; 0: it is not; -1: an error is set.
int attr_is(PyObject *t, PyObject *name, bool call, PyObject *want) {
  PyObject *v = call ? PyObject_CallMethodNoArgs(t, name) : PyObject_GetAttr(t, name);
  if (!v) return -1;
  int ok = v == want;
  Py_DECREF(v);
  return ok;
}

// t.data_ptr() as a float pointer (false: an error is set).
bool data_of(PyObject *t, const float **data) {
  PyObject *v = PyObject_CallMethodNoArgs(t, s_data_ptr);
  if (!v) return false;
  *data = (const float *)PyLong_AsVoidPtr(v);
  Py_DECREF(v);
  return !PyErr_Occurred();
}

// 1: t is a plain (its exact type one of `types`) CPU tensor of dtype `f32`; 0: it is not (or None); -1: an
// error is set.
int plain_cpu_f32(PyObject *t, PyObject *types, PyObject *f32) {
  if (t == Py_None) return 0;
  bool typed = false;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(types); i++) typed |= (PyObject *)Py_TYPE(t) == PyTuple_GET_ITEM(types, i);
  if (!typed) return 0;
  int ok = attr_is(t, s_dtype, false, f32);
  return ok <= 0 ? ok : attr_is(t, s_is_cpu, false, Py_True);
}

// plain_cpu_f32 and contiguous, its data and numel set (1); 0: not; -1: an error is set.
int plain_f32(PyObject *t, PyObject *types, PyObject *f32, const float **data, int64_t *numel) {
  int ok = plain_cpu_f32(t, types, f32);
  if (ok > 0) ok = attr_is(t, s_is_contiguous, true, Py_True);
  if (ok <= 0) return ok;
  if (!data_of(t, data)) return -1;
  PyObject *v = PyObject_CallMethodNoArgs(t, s_numel);
  if (!v) return -1;
  *numel = PyLong_AsLongLong(v);
  Py_DECREF(v);
  return PyErr_Occurred() ? -1 : 1;
}

// grad_sumsq_maxabs(params: list, types: tuple, float32, sumsq, maxabs, sumsq32) -> None | bool: when every
// parameter has a plain contiguous float32 CPU gradient, writes the gradients' sums of squares (float64), their
// max |g| (float64, NaN where the sum is NaN) and the sums as float32 (what the clipper gets) into the three
// buffers and returns whether all sums are finite; else None and nothing written (the caller takes its general
// path). A gradient stays alive while its parameter holds it, so the addresses taken here are good for the call.
PyObject *py_grad_sumsq_maxabs(FT_ARGS) {
  if (n != 6 || !PyList_Check(a[0]) || !PyTuple_Check(a[1])) {
    PyErr_SetString(PyExc_TypeError, "grad_sumsq_maxabs(params: list, types: tuple, float32, sumsq, maxabs, sumsq32)");
    return nullptr;
  }
  if (!intern_names()) return nullptr;
  Py_ssize_t count = PyList_GET_SIZE(a[0]);
  std::vector<const float *> ptrs(count > 0 ? count : 1);
  std::vector<int64_t> numel(count > 0 ? count : 1);
  for (Py_ssize_t i = 0; i < count; i++) {
    PyObject *g = PyObject_GetAttr(PyList_GET_ITEM(a[0], i), s_grad);
    if (!g) return nullptr;
    int ok = plain_f32(g, a[1], a[2], &ptrs[i], &numel[i]);
    Py_DECREF(g);
    if (ok < 0) return nullptr;
    if (ok == 0) Py_RETURN_NONE;
  }
  Held h;
  void *sq_out, *mx_out, *sq32_out;
  if (!as_pointer(a[3], &sq_out, h) || !as_pointer(a[4], &mx_out, h) || !as_pointer(a[5], &sq32_out, h)) return nullptr;
  return PyBool_FromLong(grad_figures(count, ptrs.data(), numel.data(), (double *)sq_out, (double *)mx_out,
                                      (float *)sq32_out));
}

// A tuple of 4 non-negative ints from t.shape or t.stride() (the attribute or method `name`); false if not.
bool four_ints(PyObject *t, PyObject *name, bool call, int64_t *out) {
  PyObject *v = call ? PyObject_CallMethodNoArgs(t, name) : PyObject_GetAttr(t, name);
  if (!v) return false;
  bool ok = PyTuple_Check(v) && PyTuple_GET_SIZE(v) == 4;
  for (int i = 0; ok && i < 4; i++) {
    out[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(v, i));
    ok = !PyErr_Occurred() && out[i] >= 0;
  }
  Py_DECREF(v);
  PyErr_Clear();
  return ok;
}

// attention_of(calls: list, types: tuple, float32, nb, nh, rows) -> list | False: ft_attention over the argument
// tuples (q, k, v, mask, dropout_p, is_causal) that attention kernels were called with (one per block), when
// every q and k is a plain float32 CPU tensor [B, H, T|S, D] with unit stride in D, no mask, and all calls share
// one shape and one is_causal: [entropy, max logit] per call, as Python floats (what the caller keeps; a numpy
// array and its tolist() cost ~20 us more in the loop). False otherwise (the caller looks at each call in Python).
PyObject *py_attention_of(FT_ARGS) {
  Held h;
  if (n != 6 || !PyList_Check(a[0]) || !PyTuple_Check(a[1])) {
    PyErr_SetString(PyExc_TypeError, "attention_of(calls: list, types: tuple, float32, nb, nh, rows)");
    return nullptr;
  }
  if (!intern_names()) return nullptr;
  static PyObject *s_shape = PyUnicode_InternFromString("shape"), *s_stride = PyUnicode_InternFromString("stride");
  Py_ssize_t count = PyList_GET_SIZE(a[0]);
  if (count == 0 || !s_shape || !s_stride) Py_RETURN_FALSE;
  std::vector<const float *> qp(count), kp(count);
  std::vector<int64_t> qs(3 * count), ks(3 * count);
  int64_t q_shape[4], k_shape[4], first_q[4], first_k[4], stride[4];
  int causal = -1;
  for (Py_ssize_t i = 0; i < count; i++) {
    PyObject *args = PyList_GET_ITEM(a[0], i);
    if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) < 2) Py_RETURN_FALSE;
    Py_ssize_t len = PyTuple_GET_SIZE(args);
    if (len > 3 && PyTuple_GET_ITEM(args, 3) != Py_None) Py_RETURN_FALSE;  // a mask: the caller's path
    int c = len > 5 ? PyObject_IsTrue(PyTuple_GET_ITEM(args, 5)) : 1;
    if (c < 0) return nullptr;
    if (causal >= 0 && c != causal) Py_RETURN_FALSE;
    causal = c;
    PyObject *q = PyTuple_GET_ITEM(args, 0), *k = PyTuple_GET_ITEM(args, 1);
    // q and k may be strided views (a split of a fused qkv): no contiguity asked, their strides are read below
    for (PyObject *t : {q, k}) {
      int plain = plain_cpu_f32(t, a[1], a[2]);
      if (plain < 0) return nullptr;
      if (plain == 0) Py_RETURN_FALSE;
    }
    if (!four_ints(q, s_shape, false, q_shape) || !four_ints(k, s_shape, false, k_shape)) Py_RETURN_FALSE;
    if (q_shape[0] != k_shape[0] || q_shape[1] != k_shape[1] || q_shape[3] != k_shape[3]) Py_RETURN_FALSE;
    if (i == 0) {
      memcpy(first_q, q_shape, sizeof q_shape);
      memcpy(first_k, k_shape, sizeof k_shape);
    } else if (memcmp(first_q, q_shape, sizeof q_shape) || memcmp(first_k, k_shape, sizeof k_shape)) {
      Py_RETURN_FALSE;
    }
    if (!four_ints(q, s_stride, true, stride) || stride[3] != 1) Py_RETURN_FALSE;
    memcpy(&qs[3 * i], stride, 3 * sizeof(int64_t));
    if (!four_ints(k, s_stride, true, stride) || stride[3] != 1) Py_RETURN_FALSE;
    memcpy(&ks[3 * i], stride, 3 * sizeof(int64_t));
    if (!data_of(q, &qp[i]) || !data_of(k, &kp[i])) return nullptr;
  }
  int64_t nb, nh;
  void *rows;
  if (!parse(a + 3, 3, "iip", h, &nb, &nh, &rows)) return nullptr;
  Py_buffer view;  // the number of sampled rows: from the rows buffer itself
  if (PyObject_GetBuffer(a[5], &view, PyBUF_ANY_CONTIGUOUS) != 0) return nullptr;
  int64_t p = view.len / (Py_ssize_t)sizeof(int64_t);
  PyBuffer_Release(&view);
  nb = nb < first_q[0] ? nb : first_q[0];
  nh = nh < first_q[1] ? nh : first_q[1];
  double scale = __builtin_pow((double)first_q[3], -0.5);  // as Python's d**-0.5 in attention()
  std::vector<double> out(2 * count);
  ft_attention(count, qp.data(), kp.data(), qs.data(), ks.data(), nb, nh, first_q[2], first_k[2], first_q[3],
               (const int64_t *)rows, p, causal, scale, out.data());
  PyObject *pairs = PyList_New(count);
  for (Py_ssize_t i = 0; pairs && i < count; i++) {
    PyObject *pair = Py_BuildValue("[dd]", out[2 * i], out[2 * i + 1]);
    if (!pair) {
      Py_CLEAR(pairs);
      break;
    }
    PyList_SET_ITEM(pairs, i, pair);
  }
  return pairs;
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
  void *gsq, *gmax, *bad, *wsq, *usq, *v_rms, *numel, *order, *starts, *tensors_out, *layers_out, *totals;
  if (!parse(a, n, "ipppppppippppp", h, &count, &gsq, &gmax, &bad, &wsq, &usq, &v_rms, &numel, &layers, &order,
             &starts, &tensors_out, &layers_out, &totals))
    return nullptr;
  ft_flow_tables(count, (const double *)gsq, (const double *)gmax, (const double *)bad, (const double *)wsq,
                 (const double *)usq, (const double *)v_rms, (const int64_t *)numel, layers, (const int64_t *)order,
                 (const int64_t *)starts, (float *)tensors_out, (float *)layers_out, (float *)totals);
  Py_RETURN_NONE;
}

#define FT_METHOD(name) {#name, (PyCFunction)(void (*)(void))py_##name, METH_FASTCALL, nullptr}

PyMethodDef methods[] = {
    FT_METHOD(sumsq_maxabs), FT_METHOD(one),       FT_METHOD(two),       FT_METHOD(nonfinite), FT_METHOD(sums),
    FT_METHOD(weights),      FT_METHOD(update),    FT_METHOD(logits),    FT_METHOD(attention),
    FT_METHOD(adam_step),    FT_METHOD(flow_tables), FT_METHOD(grad_sumsq_maxabs),
    FT_METHOD(attention_of), {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_flowstats", "flowtrain's CPU kernels (flowstats.cpp)", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__flowstats(void) { return PyModule_Create(&module); }
