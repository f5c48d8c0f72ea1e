// csd_fast._planner: csd_fast/planner.py's token-budget planner (steps 1-3) in C++.
//
//   python setup.py build_ext --inplace      # builds csd_fast/_planner*.so (optional extension)
//
// bfd(costs, budget) -> bytes of int64 bin ids, one per unit. `costs` is any C-contiguous int64
// buffer, already in processing order (largest first). Each unit goes to the bin with the least
// room that still fits it, ties to the lowest bin id; otherwise it opens a bin. Same answers as
// `_bfd_python` (a set of room values held by open bins, a min-heap of bin ids per room value).
// plan(unit_costs, budget, world) -> flat arrays: the sort, bfd, the split/repeat of bins for
// `world` ranks and the rounds of rank assignment, exactly as plan_batches' Python path.
// lists(values, starts, ends) -> the nested Python lists of the plan, built in one pass.
// The shuffle of rounds stays in Python (numpy's generator defines it).

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <queue>
#include <vector>

#ifdef _MSC_VER
#include <intrin.h>
#endif

namespace {

// Index of the lowest set bit of a non-zero word.
inline int64_t lowest_bit(uint64_t w) {
#ifdef _MSC_VER
  unsigned long i;
  _BitScanForward64(&i, w);
  return static_cast<int64_t>(i);
#else
  return __builtin_ctzll(w);
#endif
}

using MinHeap = std::priority_queue<int64_t, std::vector<int64_t>, std::greater<int64_t>>;

// The set of room values that some open bin has, as 64-ary levels of bit words: level 0 has a
// bit per room, level L+1 a bit per non-zero word of level L. "Least room >= lo" then costs a
// few word scans instead of a walk down a binary tree (same answer as the Python tree).
struct RoomSet {
  std::vector<std::vector<uint64_t>> levels;

  explicit RoomSet(int64_t budget) {
    int64_t bits = budget + 1;
    do {
      const int64_t words = (bits + 63) / 64;
      levels.emplace_back(words, 0);
      bits = words;
    } while (bits > 1);
  }
  void insert(int64_t room) {
    for (auto& words : levels) {
      const uint64_t before = words[room >> 6];
      words[room >> 6] = before | (uint64_t{1} << (room & 63));
      if (before) return;  // the levels above already know this word is non-empty
      room >>= 6;
    }
  }
  void erase(int64_t room) {
    for (auto& words : levels) {
      words[room >> 6] &= ~(uint64_t{1} << (room & 63));
      if (words[room >> 6]) return;
      room >>= 6;
    }
  }
  int64_t first_at_least(int64_t lo) const {
    const int64_t depth = static_cast<int64_t>(levels.size());
    int64_t level = 0;
    for (;;) {  // climb until a word holds a set bit at or after lo
      const auto& words = levels[level];
      if ((lo >> 6) >= static_cast<int64_t>(words.size())) return -1;
      const uint64_t w = words[lo >> 6] & (~uint64_t{0} << (lo & 63));
      if (w) {
        lo = (lo & ~int64_t{63}) | lowest_bit(w);
        break;
      }
      if (++level == depth) return -1;
      lo = (lo >> 6) + 1;
    }
    while (level > 0) {  // then descend to the lowest set bit below
      --level;
      lo = (lo << 6) | lowest_bit(levels[level][lo]);
    }
    return lo;
  }
};

void bfd(const int64_t* costs, int64_t n, int64_t budget, int64_t* out) {
  RoomSet rooms(budget);
  std::vector<MinHeap> heaps(budget + 1);
  int64_t num_bins = 0;
  for (int64_t u = 0; u < n; ++u) {
    const int64_t cost = costs[u];
    int64_t room = rooms.first_at_least(cost);
    int64_t b;
    if (room < 0) {
      b = num_bins++;
      room = budget;
    } else {
      MinHeap& heap = heaps[room];
      b = heap.top();
      heap.pop();
      if (heap.empty()) rooms.erase(room);
    }
    out[u] = b;
    room -= cost;
    if (heaps[room].empty()) rooms.insert(room);
    heaps[room].push(b);
  }
}

// Steps 1-3 of plan_batches for units (pairs or CLO groups) in index order, as flat arrays:
// `unit_ids` lists the units bin by bin, bin k is unit_ids[start[k]:end[k]]; round s puts bin
// assigned[s * world + r] on rank r. Returns how many bins were repeated (Python warns).
struct Plan {
  std::vector<int64_t> unit_ids, start, end, assigned;
  int64_t repeated = 0;
};

Plan plan(const int64_t* costs, int64_t n, int64_t budget, int64_t world) {
  Plan p;
  // 1. largest first, ties by index: a stable counting sort (costs lie in [0, budget])
  std::vector<int64_t> pos(budget + 2, 0);
  for (int64_t u = 0; u < n; ++u) ++pos[budget - costs[u] + 1];
  for (int64_t c = 1; c <= budget + 1; ++c) pos[c] += pos[c - 1];
  std::vector<int64_t> order(n), sorted_costs(n);
  for (int64_t c = budget, i = 0; c >= 0; --c)  // each cost value, as often as it occurs
    for (const int64_t stop = pos[budget - c + 1]; i < stop; ++i) sorted_costs[i] = c;
  for (int64_t u = 0; u < n; ++u) order[pos[budget - costs[u]]++] = u;
  std::vector<int64_t> bin_of(n);
  bfd(sorted_costs.data(), n, budget, bin_of.data());
  // units bin by bin, processing order kept inside a bin (another stable counting sort)
  int64_t num_bins = 0;
  for (int64_t i = 0; i < n; ++i) num_bins = std::max(num_bins, bin_of[i] + 1);
  std::vector<int64_t> fill(num_bins + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++fill[bin_of[i] + 1];
  for (int64_t b = 0; b < num_bins; ++b) fill[b + 1] += fill[b];
  p.start.assign(fill.begin(), fill.end() - 1);
  p.end.assign(fill.begin() + 1, fill.end());
  std::vector<int64_t> tokens(num_bins, 0);
  for (int64_t i = 0; i < n; ++i) tokens[bin_of[i]] += sorted_costs[i];
  p.unit_ids.resize(n);
  for (int64_t i = 0; i < n; ++i) p.unit_ids[fill[bin_of[i]]++] = order[i];
  auto sum = [&p, costs](int64_t b) {
    int64_t s = 0;
    for (int64_t i = p.start[b]; i < p.end[b]; ++i) s += costs[p.unit_ids[i]];
    return s;
  };
  // 2. as many bins as a multiple of world: split the bin with most units (lowest index on
  // ties) in two halves, the second half becoming the last bin; else repeat from the first
  auto units = [&p](int64_t b) { return p.end[b] - p.start[b]; };
  if (world > 1 && num_bins % world) {
    while (static_cast<int64_t>(p.start.size()) % world) {
      int64_t b = 0;
      for (int64_t k = 1; k < static_cast<int64_t>(p.start.size()); ++k)
        if (units(k) > units(b)) b = k;
      if (units(b) < 2) break;
      const int64_t mid = p.start[b] + units(b) / 2;
      p.start.push_back(mid);
      p.end.push_back(p.end[b]);
      p.end[b] = mid;
      tokens[b] = sum(b);
      tokens.push_back(sum(static_cast<int64_t>(p.start.size()) - 1));
    }
    const int64_t have = static_cast<int64_t>(p.start.size());
    if (have % world) {
      p.repeated = world - have % world;
      for (int64_t i = 0; i < p.repeated; ++i) {
        p.start.push_back(p.start[i % have]);
        p.end.push_back(p.end[i % have]);
        tokens.push_back(tokens[i % have]);
      }
    }
  }
  const int64_t total = static_cast<int64_t>(p.start.size());
  // 3. rounds of world bins, heaviest first; a round's heaviest bin to the lightest rank so far
  std::vector<int64_t> heavy(total);
  std::iota(heavy.begin(), heavy.end(), 0);
  std::stable_sort(heavy.begin(), heavy.end(),
                   [&tokens](int64_t a, int64_t b) { return tokens[a] > tokens[b]; });
  std::vector<int64_t> load(world, 0), ranks(world);
  p.assigned.assign(total, 0);
  for (int64_t k = 0; k < total; k += world) {
    std::iota(ranks.begin(), ranks.end(), 0);
    std::stable_sort(ranks.begin(), ranks.end(),
                     [&load](int64_t a, int64_t b) { return load[a] < load[b]; });
    for (int64_t j = 0; j < world && k + j < total; ++j) {
      const int64_t b = heavy[k + j];
      p.assigned[k + ranks[j]] = b;
      load[ranks[j]] += tokens[b];
    }
  }
  return p;
}

// Reads a C-contiguous int64 buffer; false (with a Python error set) otherwise.
bool get_int64(PyObject* obj, Py_buffer* view) {
  if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return false;
  const char* f = view->format;
  const bool ok = view->itemsize == 8 && f &&
                  (f[0] == 'q' || f[0] == 'l' || (f[0] == '<' && (f[1] == 'q' || f[1] == 'l')));
  if (!ok) {
    PyBuffer_Release(view);
    PyErr_SetString(PyExc_ValueError, "needs a contiguous int64 buffer");
  }
  return ok;
}

bool check_costs(const int64_t* costs, int64_t n, int64_t budget) {
  for (int64_t u = 0; u < n; ++u) {
    if (costs[u] < 0 || costs[u] > budget) {
      PyErr_Format(PyExc_ValueError, "unit %lld costs %lld, outside [0, %lld]", (long long)u,
                   (long long)costs[u], (long long)budget);
      return false;
    }
  }
  return true;
}

PyObject* to_bytes(const std::vector<int64_t>& v) {
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(v.data()),
                                   static_cast<Py_ssize_t>(v.size() * 8));
}

PyObject* py_bfd(PyObject*, PyObject* args) {
  PyObject* obj;
  long long budget;
  if (!PyArg_ParseTuple(args, "OL", &obj, &budget)) return nullptr;
  Py_buffer view;
  if (!get_int64(obj, &view)) return nullptr;
  const int64_t n = view.len / 8;
  const int64_t* costs = static_cast<const int64_t*>(view.buf);
  PyObject* result = nullptr;
  if (budget < 1) {
    PyErr_SetString(PyExc_ValueError, "bfd needs budget >= 1");
  } else if (check_costs(costs, n, budget)) {
    result = PyBytes_FromStringAndSize(nullptr, n * 8);
    if (result) {
      int64_t* out = reinterpret_cast<int64_t*>(PyBytes_AS_STRING(result));
      Py_BEGIN_ALLOW_THREADS bfd(costs, n, budget, out);
      Py_END_ALLOW_THREADS
    }
  }
  PyBuffer_Release(&view);
  return result;
}

PyObject* py_plan(PyObject*, PyObject* args) {
  PyObject* obj;
  long long budget, world;
  if (!PyArg_ParseTuple(args, "OLL", &obj, &budget, &world)) return nullptr;
  Py_buffer view;
  if (!get_int64(obj, &view)) return nullptr;
  const int64_t n = view.len / 8;
  const int64_t* costs = static_cast<const int64_t*>(view.buf);
  PyObject* result = nullptr;
  if (budget < 1 || world < 1) {
    PyErr_SetString(PyExc_ValueError, "plan needs budget >= 1 and world >= 1");
  } else if (check_costs(costs, n, budget)) {
    Plan p;
    Py_BEGIN_ALLOW_THREADS p = plan(costs, n, budget, world);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(NNNNL)", to_bytes(p.unit_ids), to_bytes(p.start), to_bytes(p.end),
                           to_bytes(p.assigned), static_cast<long long>(p.repeated));
  }
  PyBuffer_Release(&view);
  return result;
}

// lists(values, starts, ends) -> [list(values[starts[k]:ends[k]]) for each k], as Python ints
PyObject* py_lists(PyObject*, PyObject* args) {
  PyObject *vobj, *sobj, *eobj;
  if (!PyArg_ParseTuple(args, "OOO", &vobj, &sobj, &eobj)) return nullptr;
  Py_buffer vv, sv, ev;
  if (!get_int64(vobj, &vv)) return nullptr;
  if (!get_int64(sobj, &sv)) {
    PyBuffer_Release(&vv);
    return nullptr;
  }
  if (!get_int64(eobj, &ev)) {
    PyBuffer_Release(&vv);
    PyBuffer_Release(&sv);
    return nullptr;
  }
  const int64_t* vals = static_cast<const int64_t*>(vv.buf);
  const int64_t* starts = static_cast<const int64_t*>(sv.buf);
  const int64_t* ends = static_cast<const int64_t*>(ev.buf);
  const int64_t nv = vv.len / 8, nb = sv.len / 8;
  bool ok = ev.len == sv.len;
  for (int64_t k = 0; ok && k < nb; ++k)
    ok = 0 <= starts[k] && starts[k] <= ends[k] && ends[k] <= nv;
  PyObject* out = nullptr;
  if (!ok) {
    PyErr_SetString(PyExc_ValueError, "lists needs equal-length starts <= ends within the values");
  } else if ((out = PyList_New(nb))) {
    for (int64_t k = 0; k < nb && out; ++k) {
      PyObject* lst = PyList_New(ends[k] - starts[k]);
      if (!lst) {
        Py_CLEAR(out);
        break;
      }
      // a list of ints can sit on no reference cycle: untracked, the cyclic GC does not walk
      // the ~n/27 micro-batches and their n items at every collection (as CPython does for
      // tuples of atoms); ~10-20 ms less per 1M pairs
      PyObject_GC_UnTrack(lst);
      PyList_SET_ITEM(out, k, lst);
      for (int64_t i = starts[k]; i < ends[k]; ++i) {
        PyObject* v = PyLong_FromLongLong(vals[i]);
        if (!v) {
          Py_CLEAR(out);
          break;
        }
        PyList_SET_ITEM(lst, i - starts[k], v);
      }
    }
  }
  PyBuffer_Release(&vv);
  PyBuffer_Release(&sv);
  PyBuffer_Release(&ev);
  return out;
}

PyMethodDef methods[] = {
    {"bfd", py_bfd, METH_VARARGS,
     "bfd(costs: int64 buffer, budget: int) -> bytes of int64 bin ids"},
    {"plan", py_plan, METH_VARARGS,
     "plan(unit_costs: int64 buffer, budget: int, world: int) -> (unit_ids, start, end, assigned: "
     "bytes of int64, repeated: int)"},
    {"lists", py_lists, METH_VARARGS,
     "lists(values, starts, ends: int64 buffers) -> "
     "[list(values[s:e]) for s, e in zip(starts, ends)]"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_planner",
                      "Best-fit-decreasing core of csd_fast.planner", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__planner() { return PyModule_Create(&module); }
