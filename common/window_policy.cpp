#include "common/window_policy.h"

#include <algorithm>

#include "common/errors.h"

namespace ringllama {

namespace {

int64_t floor_mod(int64_t a, int64_t m) { return ((a % m) + m) % m; }
int64_t round_up(int64_t v, int64_t m) { return v + floor_mod(-v, m); }

}  // namespace

void WindowParams::validate() const {
  if (n_layers < 1) throw ConfigError(fmt::format("window: n_layers {} must be >= 1", n_layers));
  if (cpu_cap_layers < 1) throw ConfigError(fmt::format("cpu_cap_layers {} must be >= 1", cpu_cap_layers));
  if (back_margin < 0) throw ConfigError(fmt::format("back_margin {} must be >= 0", back_margin));
  // The slowest worker's next layer must stay inside the window, or nobody could move.
  const int64_t cap = std::min(cpu_cap_layers, n_layers);
  if (back_margin >= cap)
    throw ConfigError(fmt::format("back_margin {} must be below the window's {} slots (min(cpu_cap_layers {}, "
                                  "n_layers {})): the slowest worker's next layer has to fit in the window",
                                  back_margin, cap, cpu_cap_layers, n_layers));
  if (cycle_slots < 0) throw ConfigError(fmt::format("window: cycle_slots {} must be >= 0", cycle_slots));
  // The slowest worker's next layer must fit in the cycling part, behind which back_margin stays.
  if (cycle_slots > 0 && cycle_slots < cap && back_margin >= cycle_slots)
    throw ConfigError(fmt::format("back_margin {} must be below the window's {} cycling slots", back_margin,
                                  cycle_slots));
}

int64_t default_cycle_slots(int64_t cpu_cap_layers, int64_t back_margin) {
  return std::min(cpu_cap_layers, back_margin + 2);
}

namespace {

// The first pinned layer: layers [first_layer, it) cycle. Everything read fits: all pinned.
int64_t pinned_from(const WindowParams& p) {
  const int64_t cap = std::min(p.cpu_cap_layers, p.n_layers);
  const int64_t first = std::clamp<int64_t>(p.first_layer, 0, p.n_layers);
  if (cap >= p.n_layers - first) return first;
  const int64_t cycle = p.cycle_slots > 0 && p.cycle_slots < cap ? p.cycle_slots : cap;
  return p.n_layers - (cap - cycle);
}

}  // namespace

int64_t layers_read_per_pass(const WindowParams& p) {
  return pinned_from(p) - std::clamp<int64_t>(p.first_layer, 0, p.n_layers);
}

WindowPolicy::WindowPolicy(const WindowParams& p) : p_(p) {
  p_.validate();
  cap_ = std::min(p_.cpu_cap_layers, p_.n_layers);
  size_parts();
}

void WindowPolicy::size_parts() {
  p_.first_layer = std::clamp<int64_t>(p_.first_layer, 0, p_.n_layers);
  pinned_from_ = pinned_from(p_);
}

void WindowPolicy::set_first_layer(int64_t first) {
  p_.first_layer = first;
  size_parts();
  update();
}

WorkerView& WindowPolicy::get(WorkerId id, const char* what) {
  auto it = workers_.find(id);
  if (it == workers_.end()) fail("window: {} from worker {}, which is not attached", what, id);
  return it->second;
}

const WorkerView& WindowPolicy::worker(WorkerId id) const {
  auto it = workers_.find(id);
  if (it == workers_.end()) fail("window: worker {} is not attached", id);
  return it->second;
}

std::vector<WorkerView> WindowPolicy::workers() const {
  std::vector<WorkerView> out;
  for (const auto& [id, w] : workers_) out.push_back(w);
  return out;
}

void WindowPolicy::attach(WorkerId id) {
  if (workers_.count(id)) fail("window: worker {} is already attached", id);
  WorkerView w;
  w.id = id;
  workers_.emplace(id, w);
  update();
}

int64_t WindowPolicy::begin_pass(WorkerId id) {
  WorkerView& w = get(id, "begin_pass");
  if (w.active) fail("window: worker {} begins a pass while its pass at {} is in flight", id, w.pass_start);
  // The first layer 0 at or after the window's start: the pass in flight while back_margin still
  // holds its layer 0, else the next step. Never behind the window, so the window never has to
  // move back and evict what the others have not copied yet.
  const int64_t start = std::max(round_up(start_, p_.n_layers), w.next_pass_min);
  w.active = true;
  w.pass_start = start;
  w.next = start;
  update();
  return start;
}

void WindowPolicy::progress(WorkerId id, int64_t next) {
  WorkerView& w = get(id, "progress");
  if (!w.active) fail("window: progress {} from worker {}, which has no pass in flight", next, id);
  const int64_t end = w.pass_start + p_.n_layers;
  if (next < w.next || next > end)
    fail("window: worker {} reports position {}; its pass is [{}, {}) and it had copied up to {}", id, next,
         w.pass_start, end, w.next);
  w.next = next;
  update();
}

void WindowPolicy::end_pass(WorkerId id) {
  WorkerView& w = get(id, "end_pass");
  if (!w.active) fail("window: worker {} ends a pass it did not begin", id);
  w.active = false;
  w.next_pass_min = w.pass_start + p_.n_layers;
  update();
}

void WindowPolicy::detach(WorkerId id) {
  get(id, "detach");
  workers_.erase(id);
  in_convoy_.erase(id);
  update();
}

void WindowPolicy::update() {
  const WorkerView* slowest = nullptr;
  int64_t next_pass_min = 0;
  for (const auto& [id, w] : workers_) {
    next_pass_min = std::max(next_pass_min, w.next_pass_min);
    if (w.active && (!slowest || w.next < slowest->next)) slowest = &w;
  }
  int64_t want;
  if (slowest) {
    // Keep back_margin positions behind the slowest worker, but nothing of the step before its
    // pass: a pass always begins at layer 0, so those positions serve nobody.
    want = std::max(slowest->next - p_.back_margin, slowest->pass_start);
  } else {
    // Nobody in a pass: pre-load layer 0.. of the next one.
    want = std::max(round_up(start_, p_.n_layers), next_pass_min);
  }
  start_ = std::max(start_, want);

  for (const auto& [id, w] : workers_) {
    bool waits = w.active && w.next < w.pass_start + p_.n_layers && w.next % p_.n_layers >= p_.first_layer &&
                 position_of_layer(w.next % p_.n_layers) < 0;
    bool& was = in_convoy_[id];
    if (waits && !was) ++convoy_events_;
    was = waits;
  }
}

int64_t WindowPolicy::position_of_layer(int64_t layer) const {
  const int64_t n = p_.n_layers, lo = p_.first_layer, hi = pinned_from_;
  if (layer < lo || layer >= n) return -1;
  // A pinned layer serves its next position; the plain ring is the cycling part alone (hi = n).
  if (layer >= hi) return start_ + floor_mod(layer - start_, n);
  // The cycling part: the first cycling_slots() positions of layers in [lo, hi) from the window's
  // start on, skipping the others of each step.
  const int64_t at = floor_mod(start_, n);
  const int64_t first = at >= lo && at < hi ? start_ : start_ - at + (at < lo ? lo : n + lo);
  const int64_t a = first % n;
  const int64_t index = layer >= a ? layer - a : (hi - a) + (layer - lo);
  if (index >= cycling_slots()) return -1;
  return first + floor_mod(layer - a, n);
}

bool WindowPolicy::in_window(int64_t position) const {
  return position >= start_ && position_of_layer(floor_mod(position, p_.n_layers)) == position;
}

std::vector<int64_t> WindowPolicy::window_positions() const {
  std::vector<int64_t> v;
  for (int64_t l = 0; l < p_.n_layers; ++l)
    if (const int64_t p = position_of_layer(l); p >= 0) v.push_back(p);
  std::sort(v.begin(), v.end());
  return v;
}

int64_t WindowPolicy::window_end() const {
  const std::vector<int64_t> v = window_positions();
  return v.empty() ? start_ : v.back() + 1;
}

std::vector<WorkerId> WindowPolicy::convoy() const {
  std::vector<WorkerId> out;
  for (const auto& [id, waits] : in_convoy_)
    if (waits) out.push_back(id);
  return out;
}

WindowPlan WindowPolicy::plan(const std::vector<SlotView>& slots) const {
  if (static_cast<int64_t>(slots.size()) < cap_)
    fail("window: {} slots, the window needs {}", slots.size(), cap_);
  WindowPlan plan;
  const std::vector<int64_t> window = window_positions();
  plan.start = start_;
  plan.end = window.empty() ? start_ : window.back() + 1;
  plan.position.assign(slots.size(), -1);

  // Slots whose layer is in the window serve its position there, whatever step they were loaded
  // for: a layer's bytes are the same at every step.
  std::vector<bool> covered(static_cast<size_t>(p_.n_layers), false);
  for (size_t s = 0; s < slots.size(); ++s) {
    const SlotView& v = slots[s];
    if (v.fill == SlotFill::Empty || v.layer < 0 || v.layer >= p_.n_layers) continue;
    if (covered[static_cast<size_t>(v.layer)]) continue;  // a duplicate is free to reuse
    const int64_t p = position_of_layer(v.layer);
    if (p < 0) continue;
    plan.position[s] = p;
    covered[static_cast<size_t>(v.layer)] = true;
  }

  // Reusable: serving nothing in the window and not in the middle of a read. Empty ones first,
  // then the layer needed again latest, so that the soonest-needed stays longest.
  const int64_t end = plan.end;
  auto next_need = [&](int64_t layer) { return floor_mod(layer - end, p_.n_layers); };
  std::vector<size_t> reusable;
  for (size_t s = 0; s < slots.size(); ++s)
    if (plan.position[s] < 0 && slots[s].fill != SlotFill::Loading) reusable.push_back(s);
  std::stable_sort(reusable.begin(), reusable.end(), [&](size_t a, size_t b) {
    const bool ea = slots[a].fill == SlotFill::Empty || slots[a].layer < 0;
    const bool eb = slots[b].fill == SlotFill::Empty || slots[b].layer < 0;
    if (ea != eb) return ea;
    if (ea) return false;
    return next_need(slots[a].layer) > next_need(slots[b].layer);
  });

  size_t take = 0;
  for (const int64_t p : window) {
    const int64_t layer = p % p_.n_layers;
    if (covered[static_cast<size_t>(layer)]) continue;
    if (take == reusable.size()) {
      ++plan.waiting;
      continue;
    }
    const size_t s = reusable[take++];
    plan.position[s] = p;
    plan.loads.push_back({static_cast<int64_t>(s), layer, p});
  }
  return plan;
}

}  // namespace ringllama
