// csd_fast._planner: the best-fit-decreasing core of csd_fast/planner.py (`_bfd_python`) in C++.
//
//   python setup.py build_ext --inplace      # builds csd_fast/_planner*.so (optional extension)
//
// bfd(costs, budget) -> bytes of int64 bin ids, one per unit. `costs` is any C-contiguous int64
// buffer, already in processing order (largest first). Each unit goes to the bin with the least
// room that still fits it, ties to the lowest bin id; otherwise it opens a bin. Same structure as
// the Python loop, so the output is identical: a tree counting non-empty room buckets, and a
// min-heap of bin ids per room value. No Python logic lives here.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <functional>
#include <queue>
#include <vector>

namespace {

using MinHeap = std::priority_queue<int64_t, std::vector<int64_t>, std::greater<int64_t>>;

struct RoomTree {
  int64_t size = 1;
  std::vector<int32_t> count;  // count[node]: non-empty room buckets under node

  explicit RoomTree(int64_t budget) {
    while (size < budget + 1) size *= 2;
    count.assign(2 * size, 0);
  }
  void update(int64_t room, int32_t delta) {
    for (int64_t i = room + size; i; i >>= 1) count[i] += delta;
  }
  int64_t first_at_least(int64_t lo) const {
    int64_t i = lo + size;
    if (count[i]) return lo;
    bool found = false;
    while (i > 1) {  // climb until a right sibling holds a bucket
      if (!(i & 1) && count[i + 1]) {
        i += 1;
        found = true;
        break;
      }
      i >>= 1;
    }
    if (!found) return -1;
    while (i < size) i = count[2 * i] ? 2 * i : 2 * i + 1;  // leftmost bucket below
    return i - size;
  }
};

void bfd(const int64_t* costs, int64_t n, int64_t budget, int64_t* out) {
  RoomTree tree(budget);
  std::vector<MinHeap> heaps(budget + 1);
  int64_t num_bins = 0;
  for (int64_t u = 0; u < n; ++u) {
    const int64_t cost = costs[u];
    int64_t room = tree.first_at_least(cost);
    int64_t b;
    if (room < 0) {
      b = num_bins++;
      room = budget;
    } else {
      MinHeap& heap = heaps[room];
      b = heap.top();
      heap.pop();
      if (heap.empty()) tree.update(room, -1);
    }
    out[u] = b;
    room -= cost;
    if (heaps[room].empty()) tree.update(room, 1);
    heaps[room].push(b);
  }
}

PyObject* py_bfd(PyObject*, PyObject* args) {
  PyObject* obj;
  long long budget;
  if (!PyArg_ParseTuple(args, "OL", &obj, &budget)) return nullptr;
  Py_buffer view;
  if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return nullptr;
  const bool ok_type = view.itemsize == 8 && view.format &&
                       (view.format[0] == 'q' || view.format[0] == 'l' ||
                        (view.format[0] == '<' && (view.format[1] == 'q' || view.format[1] == 'l')));
  if (!ok_type || budget < 1) {
    PyBuffer_Release(&view);
    PyErr_SetString(PyExc_ValueError, "bfd needs a contiguous int64 buffer and budget >= 1");
    return nullptr;
  }
  const int64_t n = view.len / 8;
  const int64_t* costs = static_cast<const int64_t*>(view.buf);
  for (int64_t u = 0; u < n; ++u) {
    if (costs[u] < 0 || costs[u] > budget) {
      PyBuffer_Release(&view);
      PyErr_Format(PyExc_ValueError, "unit %lld costs %lld, outside [0, %lld]", (long long)u,
                   (long long)costs[u], budget);
      return nullptr;
    }
  }
  PyObject* result = PyBytes_FromStringAndSize(nullptr, n * 8);
  if (result) {
    int64_t* out = reinterpret_cast<int64_t*>(PyBytes_AS_STRING(result));
    Py_BEGIN_ALLOW_THREADS bfd(costs, n, budget, out);
    Py_END_ALLOW_THREADS
  }
  PyBuffer_Release(&view);
  return result;
}

PyMethodDef methods[] = {
    {"bfd", py_bfd, METH_VARARGS, "bfd(costs: int64 buffer, budget: int) -> bytes of int64 bin ids"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_planner",
                      "Best-fit-decreasing core of csd_fast.planner", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__planner() { return PyModule_Create(&module); }
