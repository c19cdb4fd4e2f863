// Fused host loops of ScratchPipe's slot planner (torch.ops.scratchpipe.*).
//
// Each op does in one or two passes what the pure-PyTorch reference in
// torchrec_scratchpipe/core/{plan,next_use}.py does with a chain of tensor ops, and
// produces exactly the same result (tests/test_native.py checks this on random streams).
// All tensors are CPU and contiguous; the Python side checks shapes and dtypes.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int32_t kNever = std::numeric_limits<int32_t>::max();
// Prefetch distance of the per-id loops: they are bound by memory latency (random reads
// into per-row and per-slot arrays), so the next rows' cache lines are requested early.
// Measured on the engine benchmark: 64 ids ahead plans ~17% faster than 16.
constexpr int64_t kAhead = 64;
// Row copies touch four or more lines per row: they request fewer rows ahead.
constexpr int64_t kRowsAhead = 16;

template <typename T>
void group_dedup_impl(const T* values, int64_t n, const int64_t* counts, const int64_t* base,
                      int64_t features, uint8_t* seen, int64_t* ids, int64_t* rows, int64_t& n_rows) {
  int64_t i = 0, out = 0;
  for (int64_t f = 0; f < features; ++f) {
    const int64_t b = base[f];
    const int64_t end = i + counts[f];
    for (; i < end; ++i) {
      if (i + kAhead < end) __builtin_prefetch(&seen[(static_cast<int64_t>(values[i + kAhead]) + b) >> 3]);
      const int64_t r = static_cast<int64_t>(values[i]) + b;
      ids[i] = r;
      const uint8_t bit = static_cast<uint8_t>(1u << (r & 7));
      if (!(seen[r >> 3] & bit)) {
        seen[r >> 3] |= bit;
        rows[out++] = r;
      }
    }
  }
  for (int64_t k = 0; k < out; ++k) seen[rows[k] >> 3] = 0;  // leave the bitmap clear
  n_rows = out;
}

// Group row of every id (id + its feature's base row) and the distinct rows in
// first-seen order. ``seen`` is a bitmap over rows (all clear; cleared again on return):
// at one bit per row it stays in cache where a per-row tag would not.
std::tuple<at::Tensor, at::Tensor> group_dedup(const at::Tensor& values, const at::Tensor& counts,
                                               const at::Tensor& base, at::Tensor seen) {
  const int64_t n = values.numel();
  auto ids = at::empty({n}, values.options().dtype(at::kLong));
  auto rows = at::empty({n}, values.options().dtype(at::kLong));
  int64_t n_rows = 0;
  AT_DISPATCH_INDEX_TYPES(values.scalar_type(), "group_dedup", [&] {
    group_dedup_impl<index_t>(values.data_ptr<index_t>(), n, counts.data_ptr<int64_t>(),
                              base.data_ptr<int64_t>(), counts.numel(), seen.data_ptr<uint8_t>(),
                              ids.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), n_rows);
  });
  return {ids, rows.narrow(0, 0, n_rows)};
}

// Candidates ranked by next use, kept across plans (core/recency.py ``RankedSlots``).
// An unheld slot whose row is needed within the horizon leaves the recency queue for the
// bucket of that next-use step k: a FIFO (a list linked through ``link``), in the order
// the walk met the slots, which is their recency order. Its row is next needed by batch
// k, so it stays a candidate until the plan of step k hits every slot of bucket k (that
// plan then drops the bucket whole) or until it is taken, from the front, as a victim.
// Each slot is thus ranked once per release, and no plan touches a slot it does not take.
struct Ranked {
  int32_t* link;  // per slot: the next slot in its bucket (-1: last)
  int64_t* seq;   // per slot: when it was ranked (recency order across buckets)
  int64_t* head;  // per bucket (step mod buckets): first and last slot (-1: empty), its
  int64_t* tail;  // step and its size
  int64_t* step;
  int64_t* size;
  int64_t buckets;
  int64_t* meta;  // [ranked slots, next seq]

  void push(int32_t s, int64_t k) {
    const int64_t b = k % buckets;
    if (size[b] == 0) {
      head[b] = s;
      step[b] = k;
    } else {
      TORCH_CHECK(step[b] == k, "scratchpipe.plan: a ranked bucket still holds slots of a past step");
      link[tail[b]] = s;
    }
    link[s] = -1;
    tail[b] = s;
    ++size[b];
    seq[s] = meta[1]++;
    ++meta[0];
  }

  int32_t pop(int64_t b) {
    const int32_t s = static_cast<int32_t>(head[b]);
    head[b] = link[s];
    --size[b];
    --meta[0];
    return s;
  }

  // Ranked slots of the bucket of step ``k`` (0 if it belongs to another step).
  int64_t count(int64_t k) const { return step[k % buckets] == k ? size[k % buckets] : 0; }

  void drop(int64_t k) {
    const int64_t b = k % buckets;
    if (step[b] != k) return;
    meta[0] -= size[b];
    size[b] = 0;
    head[b] = tail[b] = -1;
  }
};

// One plan: hits, victims, map updates. See SlotPlanner.try_plan.
// Victims: unheld slots whose rows no batch within ``limit`` steps needs, least recently
// used first (a walk of the recency queue from its head); then, if too few, ranked slots
// by farthest next use, least recently used first among equals. The walk moves the
// slots it passes whose rows are needed within the horizon into ``ranked`` (only with
// ``next``). Returns (slots, miss_rows, miss_slots, victim_rows, victim_slots, hist,
// head, ok); ``head`` is the queue's new start. When not ok (the misses do not fit in
// the unheld slots) nothing has changed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, bool>
plan(const at::Tensor& rows_t, int64_t step, at::Tensor row_to_slot_t, at::Tensor slot_to_row_t,
     at::Tensor last_use_t, const at::Tensor& q_slots_t, const at::Tensor& q_stamps_t, int64_t head,
     int64_t tail, int64_t oldest_held, const c10::optional<at::Tensor>& next_t, int64_t limit,
     const c10::optional<at::Tensor>& link_t, const c10::optional<at::Tensor>& seq_t,
     const c10::optional<at::Tensor>& ends_t, const c10::optional<at::Tensor>& meta_t) {
  const int64_t n = rows_t.numel();
  const int64_t* rows = rows_t.data_ptr<int64_t>();
  int32_t* row_to_slot = row_to_slot_t.data_ptr<int32_t>();
  int64_t* slot_to_row = slot_to_row_t.data_ptr<int64_t>();
  int32_t* last_use = last_use_t.data_ptr<int32_t>();
  const int32_t* q_slots = q_slots_t.data_ptr<int32_t>();
  const int32_t* q_stamps = q_stamps_t.data_ptr<int32_t>();
  const int32_t stamp = static_cast<int32_t>(step);
  const int64_t span = step - oldest_held;
  const bool future = next_t.has_value() && next_t->defined();
  const int32_t* next = future ? next_t->data_ptr<int32_t>() : nullptr;
  const int64_t next_stride = future ? next_t->stride(0) : 0;  // a column of NextUse's per-row records
  Ranked ranked{};
  if (future) {
    TORCH_CHECK(link_t.has_value() && seq_t.has_value() && ends_t.has_value() && meta_t.has_value(),
                "scratchpipe.plan: next uses need the ranked-slot state");
    int64_t* ends = ends_t->data_ptr<int64_t>();
    const int64_t nb = ends_t->size(1);
    ranked = Ranked{link_t->data_ptr<int32_t>(), seq_t->data_ptr<int64_t>(), ends, ends + nb, ends + 2 * nb,
                    ends + 3 * nb, nb, meta_t->data_ptr<int64_t>()};
    TORCH_CHECK(nb == limit + 1, "scratchpipe.plan: ranked-slot buckets do not match the horizon");
  }

  auto slots_t = at::empty({n}, rows_t.options());
  auto hist_t = at::zeros({span + 1}, rows_t.options());
  int64_t* slots = slots_t.data_ptr<int64_t>();
  int64_t* hist = hist_t.data_ptr<int64_t>();
  std::vector<int32_t> prev(n);
  std::vector<int64_t> miss_at;
  miss_at.reserve(n);

  // Pass 1: hits keep their slot and are stamped (so they are no victims); holds move.
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) __builtin_prefetch(&row_to_slot[rows[i + kAhead]]);
    if (i + kAhead / 2 < n) {
      const int32_t sa = row_to_slot[rows[i + kAhead / 2]];
      if (sa >= 0) __builtin_prefetch(&last_use[sa]);
    }
    const int32_t s = row_to_slot[rows[i]];
    if (s < 0) {
      miss_at.push_back(i);
      prev[i] = -1;
      continue;
    }
    slots[i] = s;
    const int32_t p = last_use[s];
    prev[i] = p;
    const int64_t bin = std::max<int64_t>(static_cast<int64_t>(p) - (oldest_held - 1), 0);
    hist[std::min(bin, span)] += 1;
    last_use[s] = stamp;
  }
  const int64_t n_miss = static_cast<int64_t>(miss_at.size());

  // Pass 2: walk the unheld prefix of the recency queue, least recently used first,
  // taking slots whose rows are not needed within the horizon; those that are needed
  // are set aside (``fresh``) for the buckets. Nothing is written until the plan fits.
  std::vector<int32_t> picked;
  picked.reserve(n_miss);
  std::vector<std::pair<int32_t, int32_t>> fresh;  // (slot, next-use step)
  int64_t pos = head;
  if (n_miss > 0) {
    for (; pos < tail && static_cast<int64_t>(picked.size()) < n_miss; ++pos) {
      if (pos + kAhead < tail) {
        const int32_t sa = q_slots[pos + kAhead];
        __builtin_prefetch(&last_use[sa]);
        if (future) __builtin_prefetch(&slot_to_row[sa]);
      }
      if (future && pos + kAhead / 2 < tail) {
        const int64_t rb = slot_to_row[q_slots[pos + kAhead / 2]];
        if (rb >= 0) __builtin_prefetch(&next[rb * next_stride]);
      }
      const int32_t st = q_stamps[pos];
      if (st >= oldest_held) break;  // held from here on: stamps only grow
      const int32_t s = q_slots[pos];
      if (last_use[s] != st) continue;  // stale entry
      if (future) {
        const int64_t r = slot_to_row[s];
        const int32_t nxt = r >= 0 ? next[r * next_stride] : kNever;
        if (nxt != kNever && static_cast<int64_t>(nxt) - step <= limit) {
          // rows of this batch are hits, so a candidate's next use is a later batch
          TORCH_CHECK(nxt > step, "scratchpipe.plan: next use ", nxt, " of an unheld slot is not after step ", step);
          fresh.emplace_back(s, nxt);
          continue;
        }
      }
      picked.push_back(s);
    }
  }
  const int64_t free = static_cast<int64_t>(picked.size());
  // Bucket ``step`` holds hits only (its rows are this batch's): the rest can be taken.
  const int64_t rankable =
      future ? static_cast<int64_t>(fresh.size()) + ranked.meta[0] - ranked.count(step) : 0;
  if (free + rankable < n_miss) {  // stall: undo the stamps
    for (int64_t i = 0; i < n; ++i) {
      const int32_t s = row_to_slot[rows[i]];
      if (s >= 0) last_use[s] = prev[i];
    }
    auto e = at::empty({0}, rows_t.options());
    return {e, e, e, e, e, hist_t, head, false};
  }
  if (future) {
    ranked.drop(step);  // held now
    for (const auto& f : fresh) ranked.push(f.first, f.second);
    // farthest next use first; within a step, least recently used first
    for (int64_t k = step + limit; k > step && static_cast<int64_t>(picked.size()) < n_miss; --k) {
      const int64_t b = k % ranked.buckets;
      if (ranked.step[b] != k) continue;
      while (ranked.size[b] > 0 && static_cast<int64_t>(picked.size()) < n_miss) picked.push_back(ranked.pop(b));
    }
  }

  // Pass 3: place the misses, evicting the victims' rows; update the maps.
  auto miss_rows_t = at::empty({n_miss}, rows_t.options());
  auto miss_slots_t = at::empty({n_miss}, rows_t.options());
  auto victim_rows_t = at::empty({n_miss}, rows_t.options());
  auto victim_slots_t = at::empty({n_miss}, rows_t.options());
  int64_t* miss_rows = miss_rows_t.data_ptr<int64_t>();
  int64_t* miss_slots = miss_slots_t.data_ptr<int64_t>();
  int64_t* victim_rows = victim_rows_t.data_ptr<int64_t>();
  int64_t* victim_slots = victim_slots_t.data_ptr<int64_t>();
  int64_t n_victims = 0;
  for (int64_t k = 0; k < n_miss; ++k) {
    if (k + kAhead < n_miss) {
      __builtin_prefetch(&slot_to_row[picked[k + kAhead]], 1);
      __builtin_prefetch(&row_to_slot[rows[miss_at[k + kAhead]]], 1);
    }
    if (k + kAhead / 2 < n_miss) {
      const int64_t oa = slot_to_row[picked[k + kAhead / 2]];
      if (oa >= 0) __builtin_prefetch(&row_to_slot[oa], 1);
    }
    const int64_t i = miss_at[k];
    const int64_t r = rows[i];
    const int32_t s = picked[k];
    const int64_t old = slot_to_row[s];
    if (old >= 0) {
      row_to_slot[old] = -1;
      victim_rows[n_victims] = old;
      victim_slots[n_victims++] = s;
    }
    row_to_slot[r] = s;
    slot_to_row[s] = r;
    last_use[s] = stamp;
    miss_rows[k] = r;
    miss_slots[k] = s;
    slots[i] = s;
  }
  return {slots_t, miss_rows_t, miss_slots_t, victim_rows_t.narrow(0, 0, n_victims),
          victim_slots_t.narrow(0, 0, n_victims), hist_t, pos, true};
}

// RankedSlots.order: every ranked slot, in the order it was ranked (its recency order).
at::Tensor ranked_order(const at::Tensor& link_t, const at::Tensor& seq_t, const at::Tensor& ends_t) {
  const int32_t* link = link_t.data_ptr<int32_t>();
  const int64_t* seq = seq_t.data_ptr<int64_t>();
  const int64_t* ends = ends_t.data_ptr<int64_t>();
  const int64_t nb = ends_t.size(1);
  std::vector<std::pair<int64_t, int64_t>> found;  // (seq, slot)
  for (int64_t b = 0; b < nb; ++b) {
    int64_t s = ends[b];
    for (int64_t left = ends[3 * nb + b]; left > 0; --left, s = link[s]) found.emplace_back(seq[s], s);
  }
  std::sort(found.begin(), found.end());
  auto out = at::empty({static_cast<int64_t>(found.size())}, seq_t.options());
  int64_t* o = out.data_ptr<int64_t>();
  for (size_t i = 0; i < found.size(); ++i) o[i] = found[i].second;
  return out;
}

// NextUse.push: link rows whose previous occurrence waits unplanned to this step; the
// others learn this step as their next use. ``state`` holds one record per row:
// [next use, last pushed step, position in that batch]. See core/next_use.py.
void next_use_push(const at::Tensor& rows_t, int64_t step, at::Tensor state_t, at::Tensor succ_t,
                   const at::Tensor& bases_t, int64_t first_waiting) {
  const int64_t n = rows_t.numel();
  const int64_t* rows = rows_t.data_ptr<int64_t>();
  int32_t* state = state_t.data_ptr<int32_t>();
  int32_t* succ = succ_t.data_ptr<int32_t>();
  const int64_t* bases = bases_t.data_ptr<int64_t>();
  const int32_t st = static_cast<int32_t>(step);
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) __builtin_prefetch(&state[3 * rows[i + kAhead]], 1);
    int32_t* rec = &state[3 * rows[i]];
    const int32_t prev = rec[1];
    if (prev >= first_waiting) {
      succ[bases[prev - first_waiting] + rec[2]] = st;
    } else {
      rec[0] = st;
    }
    rec[1] = st;
    rec[2] = static_cast<int32_t>(i);
  }
}

// NextUse.planned: the planned batch's rows learn their successors as next uses.
void next_use_planned(const at::Tensor& rows_t, at::Tensor state_t, const at::Tensor& succ_t) {
  const int64_t n = rows_t.numel();
  const int64_t* rows = rows_t.data_ptr<int64_t>();
  int32_t* state = state_t.data_ptr<int32_t>();
  const int32_t* succ = succ_t.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) __builtin_prefetch(&state[3 * rows[i + kAhead]], 1);
    state[3 * rows[i]] = succ[i];
  }
}

// Row copies between a large table and a compact buffer, one memcpy per row, in parallel.
// ``table`` and ``buffer`` have the same dtype and row size; each row is one contiguous run
// of bytes, and rows may be strided (e.g. one value of packed rows, ``core/store.py``).
template <bool kGather, typename T>
void copy_elements(T* table, int64_t table_stride, const int64_t* rows, T* buffer, int64_t buffer_stride, int64_t n) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      if (i + kRowsAhead < hi) __builtin_prefetch(table + rows[i + kRowsAhead] * table_stride, kGather ? 0 : 1);
      if (kGather) {
        buffer[i * buffer_stride] = table[rows[i] * table_stride];
      } else {
        table[rows[i] * table_stride] = buffer[i * buffer_stride];
      }
    }
  });
}

template <bool kGather>
void copy_rows(const at::Tensor& table, const at::Tensor& rows_t, const at::Tensor& buffer) {
  const int64_t n = rows_t.numel();
  const int64_t item = table.element_size();
  const int64_t row_bytes = table.numel() == 0 ? 0 : table.numel() / table.size(0) * item;
  const int64_t ts = table.stride(0) * item;  // bytes from one row to the next
  const int64_t bs = buffer.stride(0) * item;
  const int64_t* rows = rows_t.data_ptr<int64_t>();
  if (row_bytes == 4 && ts % 4 == 0 && bs % 4 == 0) {  // one scalar per row (row-wise state, next-use steps)
    copy_elements<kGather>(static_cast<int32_t*>(table.data_ptr()), ts / 4, rows, static_cast<int32_t*>(buffer.data_ptr()), bs / 4, n);
    return;
  }
  if (row_bytes == 8 && ts % 8 == 0 && bs % 8 == 0) {
    copy_elements<kGather>(static_cast<int64_t*>(table.data_ptr()), ts / 8, rows, static_cast<int64_t*>(buffer.data_ptr()), bs / 8, n);
    return;
  }
  char* t = static_cast<char*>(table.data_ptr());
  char* b = static_cast<char*>(buffer.data_ptr());
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      if (i + kRowsAhead < hi) {  // request the rows ahead: random rows are latency-bound
        const char* ahead = t + rows[i + kRowsAhead] * ts;
        for (int64_t c = 0; c < row_bytes; c += 64) __builtin_prefetch(ahead + c, kGather ? 0 : 1);
      }
      char* row = t + rows[i] * ts;
      if (kGather) {
        std::memcpy(b + i * bs, row, row_bytes);
      } else {
        std::memcpy(row, b + i * bs, row_bytes);
      }
    }
  });
}

// out[i] = table[rows[i]]
void gather_rows(const at::Tensor& table, const at::Tensor& rows, at::Tensor out) {
  copy_rows<true>(table, rows, out);
}

// table[rows[i]] = values[i]
void scatter_rows(at::Tensor table, const at::Tensor& rows, const at::Tensor& values) {
  copy_rows<false>(table, rows, values);
}

}  // namespace

TORCH_LIBRARY(scratchpipe, m) {
  m.def("gather_rows(Tensor table, Tensor rows, Tensor(a!) out) -> ()");
  m.def("scatter_rows(Tensor(a!) table, Tensor rows, Tensor values) -> ()");
  m.def("group_dedup(Tensor values, Tensor counts, Tensor base, Tensor(a!) seen) -> (Tensor, Tensor)");
  m.def(
      "plan(Tensor rows, int step, Tensor(a!) row_to_slot, Tensor(b!) slot_to_row, Tensor(c!) last_use, "
      "Tensor q_slots, Tensor q_stamps, int head, int tail, int oldest_held, Tensor? next, int limit, "
      "Tensor(d!)? link, Tensor(e!)? seq, Tensor(f!)? ends, Tensor(g!)? meta) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, bool)");
  m.def(
      "next_use_push(Tensor rows, int step, Tensor(a!) state, Tensor(b!) succ, Tensor bases, int first_waiting) -> ()");
  m.def("next_use_planned(Tensor rows, Tensor(a!) state, Tensor succ) -> ()");
  m.def("ranked_order(Tensor link, Tensor seq, Tensor ends) -> Tensor");
}

TORCH_LIBRARY_IMPL(scratchpipe, CPU, m) {
  m.impl("group_dedup", group_dedup);
  m.impl("plan", plan);
  m.impl("next_use_push", next_use_push);
  m.impl("next_use_planned", next_use_planned);
  m.impl("ranked_order", ranked_order);
  m.impl("gather_rows", gather_rows);
  m.impl("scatter_rows", scatter_rows);
}
