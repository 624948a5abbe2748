// The microscope's hooks along depth in C++ (module _flowhooks), for models that run in CPU float32.
//
// Why: on a 2-core CPU, between torch's ops, a Python hook costs 20-30 us even when it only looks at a tensor
// and calls a kernel: the call, the tensor's attribute getters (dtype, device, layout, version) and the
// bookkeeping all run with cold caches, and a monitored step of shakespeare-char runs ~15 of them. Here the
// same work reads the at::Tensor directly (no Python objects), the residual gradient's hook is a C++ hook that
// the autograd engine calls without the GIL, and a module hook is one C call. hooks.py keeps the general
// path (GPUs, bf16, masks, sharded tensors, anything unusual); this is its CPU float32 fast path, written to
// give the same numbers: the same kernels (flowstats.cpp) on the same tensors, accumulated the same way.
//
// One Probe per hooks.py probe (a capsule). Per block boundary it holds h (as the block returned it) until
// h's gradient arrives, then reads both in one kernel call; an h whose gradient never comes is read when the
// next micro-batch begins or when the step's numbers are taken. The Probe keeps no Python object alive
// beyond a step except its fallbacks, and the gradient hooks hold it only weakly (no reference cycle through
// the autograd graph).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/python_variable.h>

#include <chrono>
#include <cmath>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "flowstats.cpp"

namespace {

using Clock = std::chrono::steady_clock;
constexpr double NaN = __builtin_nan("");

// Running max that keeps NaN, as hooks.py's _max.
inline double nan_max(double prev, double value) { return (prev != prev || prev >= value) ? prev : value; }

struct Boundary {
  at::Tensor held;      // h as the block returned it, until its gradient's hook reads both
  int64_t version = 0;  // h's version counter when it was held
  bool changed = false;  // the model changed h in place after the block once: read in the forward from then on
  bool resid_seen = false, act_seen = false;
  double resid = 0, act_sumsq = 0, act_max = 0;
  int64_t count = 0;

  void add_activation(double sq, double mx, int64_t n) {
    act_sumsq = act_seen ? act_sumsq + sq : sq;
    act_max = act_seen ? nan_max(act_max, mx) : mx;
    act_seen = true;
    count += n;
  }
  void add_resid(double sq) {
    resid = resid_seen ? resid + sq : sq;
    resid_seen = true;
  }
};

struct Probe {
  std::mutex mu;  // the gradient hooks run on the autograd engine's thread, without the GIL
  std::vector<Boundary> b;
  int holding = 0;
  // activations read in a gradient hook, released where the GIL is held: the last reference to a tensor that
  // Python has seen frees its Python object, which from the autograd engine's thread means taking the GIL
  // (~3 us a boundary in the loop)
  std::vector<at::Tensor> done;
  bool armed = false;
  int64_t spent_ns = 0;
  int64_t hold_bytes = 0;  // the q, k of the attention kernels are kept while they hold at most this much
  std::vector<PyObject *> qk_args;  // per block: the kernel's argument tuple (a strong reference), first call
  std::vector<char> qk_taken;
  bool logits_seen = false;
  double logits_max = 0, lse_sum = 0;
  int64_t logits_rows = 0;
  bool py_pending = false;  // hooks.py's general path holds activations: flush them at a new micro-batch
  // hooks.py's general path, for whatever this file does not take (strong references, cleared with the GIL)
  PyObject *observe = nullptr;  // observe(index, h) -> bool (whether it now holds something to flush)
  PyObject *capture = nullptr;  // capture(block, args): q, k kept by hooks.py
  PyObject *measure = nullptr;  // measure(z): logits by hooks.py
  PyObject *flush = nullptr;    // flush(): hooks.py's held and pending activations
  PyObject *rows_of = nullptr;  // rows_of(T) -> int64 numpy array: the sampled query rows
  PyObject *plain = nullptr;    // (torch.Tensor, torch.nn.Parameter): the exact types taken here
  std::vector<std::pair<int64_t, std::vector<int64_t>>> rows_cache;

  void clear_python() {
    for (PyObject *&o : qk_args) Py_CLEAR(o);
    for (PyObject **o : {&observe, &capture, &measure, &flush, &rows_of, &plain}) Py_CLEAR(*o);
  }
};

using ProbePtr = std::shared_ptr<Probe>;
const char *CAPSULE = "flowtrain.flowhooks.Probe";

// Elapsed time of one hook, booked to the probe (the microscope's stopwatch).
struct Timed {
  Probe &p;
  Clock::time_point start = Clock::now();
  explicit Timed(Probe &probe) : p(probe) {}
  ~Timed() { p.spent_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count(); }
};

ProbePtr *probe_of(PyObject *capsule) { return (ProbePtr *)PyCapsule_GetPointer(capsule, CAPSULE); }

void drop_probe(PyObject *capsule) {
  ProbePtr *p = probe_of(capsule);
  if (!p) return;
  {
    std::lock_guard<std::mutex> lock((*p)->mu);
    (*p)->clear_python();  // here, with the GIL: the last owner may be a gradient hook on the engine's thread
  }
  delete p;
}

// The exact type of `o` is one of the probe's plain tensor types (not a subclass such as DTensor).
bool is_plain(const Probe &p, PyObject *o) {
  if (!p.plain) return false;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(p.plain); i++)
    if ((PyObject *)Py_TYPE(o) == PyTuple_GET_ITEM(p.plain, i)) return true;
  return false;
}

bool cpu_f32(const at::Tensor &t) { return t.defined() && t.scalar_type() == at::kFloat && t.is_cpu(); }

// (sum of squares, max |x|) of a CPU float32 contiguous tensor; max is NaN when the sum is (as kernels.one).
std::pair<double, double> one(const at::Tensor &t) {
  double out[2];
  ft_sumsq_maxabs1(t.const_data_ptr<float>(), t.numel(), out);
  return {out[0], out[0] == out[0] ? out[1] : out[0]};
}

// Read a held h alone (its gradient did not come); the lock is held.
void read_held(Probe &p, Boundary &b) {
  auto [sq, mx] = one(b.held);
  if (b.held._version() != b.version) sq = mx = NaN, b.changed = true;
  b.add_activation(sq, mx, b.held.numel());
  p.done.push_back(std::move(b.held));
  b.held.reset();
  p.holding--;
}

void flush_held(Probe &p) {
  for (Boundary &b : p.b)
    if (b.held.defined()) read_held(p, b);
}

// The residual gradient at boundary `index`: with h held, both in one kernel call (h is in cache here: the
// backward of the layer that took h has just read it). Index 0 is the last boundary the backward reaches: the
// activations still held then (their gradient never came) are read.
void on_gradient(const std::weak_ptr<Probe> &weak, size_t index, const at::Tensor &grad) {
  ProbePtr p = weak.lock();
  if (!p || !grad.defined()) return;
  std::lock_guard<std::mutex> lock(p->mu);
  Timed timed(*p);
  if (index >= p->b.size()) return;
  at::Tensor g = grad;
  if (!(cpu_f32(g) && g.is_contiguous())) g = g.detach().to(at::kCPU, at::kFloat).contiguous();
  Boundary &b = p->b[index];
  if (b.held.defined()) {
    double out[4];
    ft_sumsq_maxabs2(g.const_data_ptr<float>(), g.numel(), b.held.const_data_ptr<float>(), b.held.numel(), out);
    double asq = out[2], amx = out[2] == out[2] ? out[3] : out[2];
    if (b.held._version() != b.version) asq = amx = NaN, b.changed = true;
    b.add_activation(asq, amx, b.held.numel());
    b.add_resid(out[0]);
    p->done.push_back(std::move(b.held));
    b.held.reset();
    p->holding--;
  } else {
    b.add_resid(one(g).first);
  }
  if (index == 0 && p->holding) flush_held(*p);
}

void hook_gradient(const ProbePtr &p, size_t index, const at::Tensor &h) {
  std::weak_ptr<Probe> weak = p;
  h.register_hook([weak, index](const at::Tensor &grad) { on_gradient(weak, index, grad); });
}

PyObject *first_tensor(PyObject *o) {  // a tensor, or a tuple/list whose first element is one (borrowed)
  if (THPVariable_Check(o)) return o;
  if ((PyTuple_Check(o) || PyList_Check(o)) && PySequence_Fast_GET_SIZE(o) > 0) {
    PyObject *first = PySequence_Fast_ITEMS(o)[0];
    if (THPVariable_Check(first)) return first;
  }
  return nullptr;
}

// What hooks.py's _observe does with a block's output h at `index`, for a plain contiguous CPU float32 h (true);
// false: hooks.py's general path takes it. Called with the GIL, not the lock.
bool observe_plain(const ProbePtr &pp, size_t index, PyObject *object) {
  Probe &p = *pp;
  if (!is_plain(p, object)) return false;
  const at::Tensor &h = THPVariable_Unpack(object);
  if (!cpu_f32(h) || !h.is_contiguous()) return false;
  std::lock_guard<std::mutex> lock(p.mu);
  Boundary &b = p.b[index];
  bool residual = h.requires_grad();
  if (b.changed || !residual) {  // read now, as the block returned it
    auto [sq, mx] = one(h);
    b.add_activation(sq, mx, h.numel());
  } else {
    if (b.held.defined()) read_held(p, b);  // one whose gradient did not come: read it now
    b.held = h;
    b.version = h._version();
    p.holding++;
  }
  if (residual) hook_gradient(pp, index, h);
  return true;
}

// A block's output (or, index 0, the first block's input): the plain case here, the rest in hooks.py.
PyObject *observe_boundary(const ProbePtr &pp, size_t index, PyObject *output) {
  Probe &p = *pp;
  PyObject *h = first_tensor(output);
  if (h && observe_plain(pp, index, h)) Py_RETURN_NONE;
  PyObject *args[2] = {PyLong_FromSsize_t((Py_ssize_t)index), h ? h : Py_None};
  if (!args[0]) return nullptr;
  PyObject *held = PyObject_Vectorcall(p.observe, args, 2, nullptr);
  Py_DECREF(args[0]);
  if (!held) return nullptr;
  int pending = PyObject_IsTrue(held);
  Py_DECREF(held);
  if (pending < 0) return nullptr;
  p.py_pending |= pending > 0;
  Py_RETURN_NONE;
}

bool armed_for_grad(const Probe &p) { return p.armed && c10::GradMode::is_enabled(); }

#define FH_ARGS PyObject *, PyObject *const *a, Py_ssize_t n

bool probe_arg(PyObject *o, ProbePtr **out) {
  *out = probe_of(o);
  return *out != nullptr;
}

// An index in [0, size) from a Python int (false: an error is set, naming `what`).
bool index_arg(PyObject *o, size_t size, const char *what, Py_ssize_t *out) {
  *out = PyLong_AsSsize_t(o);
  if (PyErr_Occurred()) return false;
  if (*out >= 0 && (size_t)*out < size) return true;
  PyErr_Format(PyExc_IndexError, "%s %zd out of range", what, *out);
  return false;
}

// probe(boundaries, blocks, observe, capture, measure, flush, rows_of, plain_types, hold_bytes) -> capsule
PyObject *py_probe(FH_ARGS) {
  if (n != 9 || !PyTuple_Check(a[7])) {
    PyErr_SetString(PyExc_TypeError, "probe(boundaries, blocks, observe, capture, measure, flush, rows_of, types, hold)");
    return nullptr;
  }
  Py_ssize_t boundaries = PyLong_AsSsize_t(a[0]), blocks = PyLong_AsSsize_t(a[1]);
  int64_t hold = PyLong_AsLongLong(a[8]);
  if (PyErr_Occurred()) return nullptr;
  auto *pp = new ProbePtr(std::make_shared<Probe>());
  Probe &p = **pp;
  p.b.resize(boundaries);
  p.qk_args.assign(blocks, nullptr);
  p.qk_taken.assign(blocks, 0);
  p.hold_bytes = hold;
  PyObject **slots[6] = {&p.observe, &p.capture, &p.measure, &p.flush, &p.rows_of, &p.plain};
  for (int i = 0; i < 6; i++) {
    Py_INCREF(a[2 + i]);
    *slots[i] = a[2 + i];
  }
  PyObject *capsule = PyCapsule_New(pp, CAPSULE, drop_probe);
  if (!capsule) {
    p.clear_python();
    delete pp;
  }
  return capsule;
}

// arm(probe, on): on: forget this step's numbers and start taking them; off: stop (hooks return at once).
PyObject *py_arm(FH_ARGS) {
  ProbePtr *pp;
  if (n != 2 || !probe_arg(a[0], &pp)) return nullptr;
  int on = PyObject_IsTrue(a[1]);
  if (on < 0) return nullptr;
  Probe &p = **pp;
  std::vector<PyObject *> args;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    p.armed = on;
    p.done.clear();
    if (on) {
      for (Boundary &b : p.b) {
        bool changed = b.changed;
        b = Boundary();
        b.changed = changed;
      }
      p.holding = 0;
      args.swap(p.qk_args);
      p.qk_args.assign(args.size(), nullptr);
      p.qk_taken.assign(p.qk_taken.size(), 0);
      p.logits_seen = false, p.logits_max = p.lse_sum = 0, p.logits_rows = 0;
      p.py_pending = false;
    }
  }
  for (PyObject *o : args) Py_XDECREF(o);
  Py_RETURN_NONE;
}

// on_output(probe, index, module, args, output): a block's forward hook.
PyObject *py_on_output(FH_ARGS) {
  ProbePtr *pp;
  if (n != 5 || !probe_arg(a[0], &pp)) return nullptr;
  Probe &p = **pp;
  if (!armed_for_grad(p)) Py_RETURN_NONE;
  Py_ssize_t index;
  if (!index_arg(a[1], p.b.size(), "boundary", &index)) return nullptr;
  Timed timed(p);
  return observe_boundary(*pp, index, a[4]);
}

// on_input(probe, module, args): the first block's forward pre-hook. A new micro-batch begins: what the last
// one left held is read; then h_0, the block's input, is observed.
PyObject *py_on_input(FH_ARGS) {
  ProbePtr *pp;
  if (n != 3 || !probe_arg(a[0], &pp)) return nullptr;
  Probe &p = **pp;
  if (!p.armed || !PyTuple_Check(a[2]) || PyTuple_GET_SIZE(a[2]) == 0 || p.b.empty()) Py_RETURN_NONE;
  Timed timed(p);
  {
    std::lock_guard<std::mutex> lock(p.mu);
    if (p.holding) flush_held(p);
    p.done.clear();
  }
  if (p.py_pending) {
    p.py_pending = false;
    PyObject *r = PyObject_CallNoArgs(p.flush);
    if (!r) return nullptr;
    Py_DECREF(r);
  }
  if (!c10::GradMode::is_enabled()) Py_RETURN_NONE;
  return observe_boundary(*pp, 0, PyTuple_GET_ITEM(a[2], 0));
}

// on_kernel(probe, block, module, args): the attention kernel's forward pre-hook, args = (q, k, v, mask,
// dropout_p, is_causal). The first micro-batch's call is kept as it is when q is a plain CPU float32 tensor
// without a mask whose q and k hold little memory; attention() reads them after the backward pass. Anything
// else goes to hooks.py's capture(block, args).
PyObject *py_on_kernel(FH_ARGS) {
  ProbePtr *pp;
  if (n != 4 || !probe_arg(a[0], &pp)) return nullptr;
  Probe &p = **pp;
  PyObject *args = a[3];
  if (!armed_for_grad(p) || !PyTuple_Check(args) || PyTuple_GET_SIZE(args) < 2) Py_RETURN_NONE;
  Py_ssize_t block;
  if (!index_arg(a[1], p.qk_taken.size(), "block", &block)) return nullptr;
  if (p.qk_taken[block]) Py_RETURN_NONE;
  Timed timed(p);
  p.qk_taken[block] = 1;
  PyObject *q = PyTuple_GET_ITEM(args, 0);
  if (PyTuple_GET_SIZE(args) > 3 && PyTuple_GET_ITEM(args, 3) == Py_None && is_plain(p, q)) {
    const at::Tensor &t = THPVariable_Unpack(q);
    if (cpu_f32(t) && t.numel() * 12 <= p.hold_bytes) {  // 12: hooks.py's _QKV_BYTES
      Py_INCREF(args);
      Py_XSETREF(p.qk_args[block], args);
      Py_RETURN_NONE;
    }
  }
  PyObject *call[2] = {a[1], args};
  PyObject *r = PyObject_Vectorcall(p.capture, call, 2, nullptr);
  if (!r) return nullptr;
  Py_DECREF(r);
  Py_RETURN_NONE;
}

// on_logits(probe, module, args, output): the output head's forward hook: max |z| and the sum of the rows'
// log-sum-exp, in one pass while the logits are in cache.
PyObject *py_on_logits(FH_ARGS) {
  ProbePtr *pp;
  if (n != 4 || !probe_arg(a[0], &pp)) return nullptr;
  Probe &p = **pp;
  if (!armed_for_grad(p)) Py_RETURN_NONE;
  PyObject *z = first_tensor(a[3]);
  if (!z) Py_RETURN_NONE;
  Timed timed(p);
  if (is_plain(p, z)) {
    const at::Tensor &t = THPVariable_Unpack(z);
    if (cpu_f32(t) && t.is_contiguous() && t.dim() > 0) {
      int64_t v = t.size(-1), rows = v ? t.numel() / v : 0;
      double out[2];
      ft_logits(t.const_data_ptr<float>(), rows, v, out);
      double mx = out[1] == out[1] ? out[0] : NaN;
      p.logits_max = p.logits_seen ? nan_max(p.logits_max, mx) : mx;
      p.lse_sum = p.logits_seen ? p.lse_sum + out[1] : out[1];
      p.logits_rows += rows;
      p.logits_seen = true;
      Py_RETURN_NONE;
    }
  }
  PyObject *r = PyObject_CallOneArg(p.measure, z);
  if (!r) return nullptr;
  Py_DECREF(r);
  Py_RETURN_NONE;
}

PyObject *float_or_none(bool seen, double v) { return seen ? PyFloat_FromDouble(v) : Py_NewRef(Py_None); }

// take(probe) -> (resid, act_sumsq, act_max, act_count, seconds): this step's sums per boundary (None where
// not seen; held activations are read first) and the time the hooks took since the last take; both reset.
PyObject *py_take(FH_ARGS) {
  ProbePtr *pp;
  if (n != 1 || !probe_arg(a[0], &pp)) return nullptr;
  Probe &p = **pp;
  std::lock_guard<std::mutex> lock(p.mu);
  {
    Timed timed(p);
    if (p.holding) flush_held(p);
    p.done.clear();
  }
  Py_ssize_t count = (Py_ssize_t)p.b.size();
  PyObject *resid = PyList_New(count), *sq = PyList_New(count), *mx = PyList_New(count), *num = PyList_New(count);
  PyObject *out = nullptr;
  if (resid && sq && mx && num) {
    for (Py_ssize_t i = 0; i < count; i++) {
      Boundary &b = p.b[i];
      PyList_SET_ITEM(resid, i, float_or_none(b.resid_seen, b.resid));
      PyList_SET_ITEM(sq, i, float_or_none(b.act_seen, b.act_sumsq));
      PyList_SET_ITEM(mx, i, float_or_none(b.act_seen, b.act_max));
      PyList_SET_ITEM(num, i, PyLong_FromLongLong(b.count));
      b.resid_seen = b.act_seen = false, b.resid = b.act_sumsq = b.act_max = 0, b.count = 0;
    }
    out = Py_BuildValue("(OOOOd)", resid, sq, mx, num, p.spent_ns * 1e-9);
    p.spent_ns = 0;
  }
  for (PyObject *o : {resid, sq, mx, num}) Py_XDECREF(o);
  return out;
}

// matrix(probe, attention, scale, out) -> seconds | None: hooks.py's depth matrix (_depth_matrix) written into
// `out` (a float32 [boundaries, 5] array) when this probe measured everything of the step (the caller checks
// that its own path measured nothing) and every attention entry is None or a pair of floats; the sums are then
// reset, and the hooks' time since the last take is returned. None (nothing changed): the caller takes them
// with take() and builds the matrix itself.
PyObject *py_matrix(FH_ARGS) {
  ProbePtr *pp;
  if (n != 4 || !probe_arg(a[0], &pp) || !PyList_Check(a[1])) return PyErr_Occurred() ? nullptr : Py_NewRef(Py_None);
  Probe &p = **pp;
  double scale = PyFloat_AsDouble(a[2]);
  if (PyErr_Occurred()) return nullptr;
  Py_ssize_t rows = (Py_ssize_t)p.b.size(), blocks = PyList_GET_SIZE(a[1]);
  if (blocks != rows - 1) Py_RETURN_NONE;
  std::vector<double> attention(2 * blocks, NaN);
  for (Py_ssize_t i = 0; i < blocks; i++) {
    PyObject *pair = PyList_GET_ITEM(a[1], i);
    if (pair == Py_None) continue;
    if (!PyList_Check(pair) || PyList_GET_SIZE(pair) != 2) Py_RETURN_NONE;
    for (int j = 0; j < 2; j++) {
      PyObject *v = PyList_GET_ITEM(pair, j);
      if (!PyFloat_CheckExact(v)) Py_RETURN_NONE;
      attention[2 * i + j] = PyFloat_AS_DOUBLE(v);
    }
  }
  Py_buffer view;
  if (PyObject_GetBuffer(a[3], &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return nullptr;
  bool fits = view.itemsize == 4 && view.format && view.format[0] == 'f' && view.len == rows * 5 * 4;
  if (!fits) {
    PyBuffer_Release(&view);
    PyErr_SetString(PyExc_ValueError, "matrix: out must be a float32 array of [boundaries, 5]");
    return nullptr;
  }
  float *out = (float *)view.buf;
  std::lock_guard<std::mutex> lock(p.mu);
  {
    Timed timed(p);
    if (p.holding) flush_held(p);
    p.done.clear();
    for (Py_ssize_t i = 0; i < rows; i++) {  // as _depth_matrix: square roots, NaN where unseen or negative
      Boundary &b = p.b[i];
      float *row = out + 5 * i;
      row[0] = b.resid_seen && b.resid >= 0 ? (float)(std::sqrt(b.resid) / scale) : (float)NaN;
      row[1] = b.act_seen && b.act_sumsq >= 0 ? (float)std::sqrt(b.act_sumsq / (double)(b.count > 1 ? b.count : 1))
                                              : (float)NaN;
      row[2] = b.act_seen ? (float)b.act_max : (float)NaN;
      row[3] = i ? (float)attention[2 * (i - 1)] : (float)NaN;
      row[4] = i ? (float)attention[2 * (i - 1) + 1] : (float)NaN;
      b.resid_seen = b.act_seen = false, b.resid = b.act_sumsq = b.act_max = 0, b.count = 0;
    }
  }
  PyBuffer_Release(&view);
  double spent = p.spent_ns * 1e-9;
  p.spent_ns = 0;
  return PyFloat_FromDouble(spent);
}

// take_logits(probe) -> (max |z| or None, sum of log-sum-exp, rows, seconds); reset.
PyObject *py_take_logits(FH_ARGS) {
  ProbePtr *pp;
  if (n != 1 || !probe_arg(a[0], &pp)) return nullptr;
  Probe &p = **pp;
  PyObject *mx = float_or_none(p.logits_seen, p.logits_max);
  PyObject *out = Py_BuildValue("(NdLd)", mx, p.lse_sum, (long long)p.logits_rows, p.spent_ns * 1e-9);
  p.logits_seen = false, p.logits_max = p.lse_sum = 0, p.logits_rows = 0, p.spent_ns = 0;
  return out;
}

const std::vector<int64_t> *rows_for(Probe &p, int64_t T) {
  for (auto &entry : p.rows_cache)
    if (entry.first == T) return &entry.second;
  PyObject *t = PyLong_FromLongLong(T);
  if (!t) return nullptr;
  PyObject *r = PyObject_CallOneArg(p.rows_of, t);
  Py_DECREF(t);
  if (!r) return nullptr;
  Py_buffer view;
  if (PyObject_GetBuffer(r, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
    Py_DECREF(r);
    return nullptr;
  }
  std::vector<int64_t> rows((const int64_t *)view.buf, (const int64_t *)view.buf + view.len / sizeof(int64_t));
  bool ok = view.itemsize == (Py_ssize_t)sizeof(int64_t);
  PyBuffer_Release(&view);
  Py_DECREF(r);
  if (!ok) {
    PyErr_SetString(PyExc_TypeError, "rows_of must return an int64 array");
    return nullptr;
  }
  p.rows_cache.emplace_back(T, std::move(rows));
  return &p.rows_cache.back().second;
}

// attention(probe, nb, nh) -> (pairs, left): the sampled attention of the kept kernel calls, one kernel call for
// all blocks when every q and k is [B, H, T|S, D] with unit stride in D and they share one shape and one
// is_causal: pairs[block] = [entropy, max logit] (None where nothing was kept). Otherwise `left` lists the
// (block, args) for hooks.py to look at one by one. The kept calls are released either way.
PyObject *py_attention(FH_ARGS) {
  ProbePtr *pp;
  if (n != 3 || !probe_arg(a[0], &pp)) return nullptr;
  Probe &p = **pp;
  int64_t nb = PyLong_AsLongLong(a[1]), nh = PyLong_AsLongLong(a[2]);
  if (PyErr_Occurred()) return nullptr;
  Timed timed(p);
  std::vector<Py_ssize_t> index;
  for (size_t i = 0; i < p.qk_args.size(); i++)
    if (p.qk_args[i]) index.push_back((Py_ssize_t)i);
  Py_ssize_t blocks = (Py_ssize_t)p.qk_args.size(), count = (Py_ssize_t)index.size();
  std::vector<const float *> qp(count), kp(count);
  std::vector<int64_t> qs(3 * count), ks(3 * count);
  int64_t shape_q[4] = {0}, shape_k[4] = {0};
  int causal = -1;
  bool one_call = count > 0;
  for (Py_ssize_t c = 0; one_call && c < count; c++) {
    PyObject *args = p.qk_args[index[c]];
    Py_ssize_t len = PyTuple_GET_SIZE(args);
    int is_causal = len > 5 ? PyObject_IsTrue(PyTuple_GET_ITEM(args, 5)) : 1;
    if (is_causal < 0) return nullptr;
    PyObject *qo = PyTuple_GET_ITEM(args, 0), *ko = PyTuple_GET_ITEM(args, 1);
    if (!is_plain(p, qo) || !is_plain(p, ko) || (causal >= 0 && is_causal != causal)) {
      one_call = false;
      break;
    }
    causal = is_causal;
    const at::Tensor &q = THPVariable_Unpack(qo), &k = THPVariable_Unpack(ko);
    if (!cpu_f32(q) || !cpu_f32(k) || q.dim() != 4 || k.dim() != 4 || q.stride(3) != 1 || k.stride(3) != 1) {
      one_call = false;
      break;
    }
    for (int d = 0; d < 4; d++) {
      if (c == 0) shape_q[d] = q.size(d), shape_k[d] = k.size(d);
      one_call &= q.size(d) == shape_q[d] && k.size(d) == shape_k[d];
    }
    one_call &= shape_q[0] == shape_k[0] && shape_q[1] == shape_k[1] && shape_q[3] == shape_k[3];
    for (int d = 0; d < 3; d++) qs[3 * c + d] = q.stride(d), ks[3 * c + d] = k.stride(d);
    qp[c] = q.const_data_ptr<float>(), kp[c] = k.const_data_ptr<float>();
  }
  std::vector<double> out(2 * count);
  if (one_call) {
    const std::vector<int64_t> *rows = rows_for(p, shape_q[2]);
    if (!rows) return nullptr;
    int64_t b = nb < shape_q[0] ? nb : shape_q[0], h = nh < shape_q[1] ? nh : shape_q[1];
    double scale = std::pow((double)shape_q[3], -0.5);  // as Python's d**-0.5 in hooks.py
    ft_attention(count, qp.data(), kp.data(), qs.data(), ks.data(), b, h, shape_q[2], shape_k[2], shape_q[3],
                 rows->data(), (int64_t)rows->size(), causal, scale, out.data());
  }
  PyObject *pairs = PyList_New(blocks), *left = PyList_New(0);
  PyObject *result = nullptr;
  bool ok = pairs && left;
  for (Py_ssize_t i = 0; ok && i < blocks; i++) {
    Py_INCREF(Py_None);
    PyList_SET_ITEM(pairs, i, Py_None);
  }
  for (Py_ssize_t c = 0; ok && c < count; c++) {
    Py_ssize_t block = index[c];
    PyObject *item = one_call ? Py_BuildValue("[dd]", out[2 * c], out[2 * c + 1])
                              : Py_BuildValue("(nO)", block, p.qk_args[block]);
    if (!item) {
      ok = false;
    } else if (one_call) {
      PyList_SetItem(pairs, block, item);  // steals item
    } else {
      ok = PyList_Append(left, item) == 0;
      Py_DECREF(item);
    }
  }
  if (ok) result = PyTuple_Pack(2, pairs, left);
  Py_XDECREF(pairs);
  Py_XDECREF(left);
  for (Py_ssize_t c = 0; c < count; c++) Py_CLEAR(p.qk_args[index[c]]);
  return result;
}

// grad_sumsq_maxabs(params: list, types: tuple, sumsq, maxabs, sumsq32) -> None | bool: flowbind.cpp's function
// of the same name (the same contract and kernel), reading each parameter's gradient as an at::Tensor instead of
// through ~6 Python attribute reads per parameter (~0.1 ms a step on shakespeare-char's 27 tensors in the loop).
PyObject *py_grad_sumsq_maxabs(FH_ARGS) {
  if (n != 5 || !PyList_Check(a[0]) || !PyTuple_Check(a[1])) {
    PyErr_SetString(PyExc_TypeError, "grad_sumsq_maxabs(params: list, types: tuple, sumsq, maxabs, sumsq32)");
    return nullptr;
  }
  Py_ssize_t count = PyList_GET_SIZE(a[0]);
  std::vector<const float *> ptrs(count > 0 ? count : 1);
  std::vector<int64_t> numel(count > 0 ? count : 1);
  for (Py_ssize_t i = 0; i < count; i++) {
    PyObject *param = PyList_GET_ITEM(a[0], i);
    bool typed = false;
    for (Py_ssize_t t = 0; t < PyTuple_GET_SIZE(a[1]); t++) typed |= (PyObject *)Py_TYPE(param) == PyTuple_GET_ITEM(a[1], t);
    if (!typed) Py_RETURN_NONE;
    const at::Tensor &g = THPVariable_Unpack(param).grad();
    if (!cpu_f32(g) || !g.is_contiguous() || g.key_set().has(c10::DispatchKey::Python)) Py_RETURN_NONE;
    ptrs[i] = g.const_data_ptr<float>();
    numel[i] = g.numel();
  }
  Py_buffer views[3];
  int got = 0;
  for (; got < 3; got++)
    if (PyObject_GetBuffer(a[2 + got], &views[got], PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS) != 0) break;
  PyObject *result = nullptr;
  if (got == 3 && views[0].len >= count * 8 && views[1].len >= count * 8 && views[2].len >= count * 4) {
    bool finite = grad_figures(count, ptrs.data(), numel.data(), (double *)views[0].buf, (double *)views[1].buf,
                               (float *)views[2].buf);
    result = PyBool_FromLong(finite);
  } else if (got == 3) {
    PyErr_SetString(PyExc_ValueError, "grad_sumsq_maxabs: output buffers too small");
  }
  for (int i = 0; i < got; i++) PyBuffer_Release(&views[i]);
  return result;
}

// A C++ exception must not cross into Python (it would end the process): torch's own calls above may throw
// (c10::Error) on tensors they refuse; the caller then gets a RuntimeError with torch's message.
template <PyObject *(*F)(PyObject *, PyObject *const *, Py_ssize_t)>
PyObject *guarded(PyObject *self, PyObject *const *a, Py_ssize_t n) {
  try {
    return F(self, a, n);
  } catch (const std::exception &e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

#define FH_METHOD(name) {#name, (PyCFunction)(void (*)(void))guarded<py_##name>, METH_FASTCALL, nullptr}

PyMethodDef methods[] = {
    FH_METHOD(probe),  FH_METHOD(arm),         FH_METHOD(on_output), FH_METHOD(on_input),
    FH_METHOD(on_kernel), FH_METHOD(on_logits), FH_METHOD(take),      FH_METHOD(take_logits),
    FH_METHOD(attention), FH_METHOD(grad_sumsq_maxabs),
    FH_METHOD(matrix),    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_flowhooks", "flowtrain's hooks along depth in C++ (flowhooks.cpp)",
                      -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__flowhooks(void) { return PyModule_Create(&module); }
