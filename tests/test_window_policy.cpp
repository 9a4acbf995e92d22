// The ring window's policy: what it holds, what it loads, and the invariant that a slot holding a
// position some active worker has not copied is never reused.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>

#include "common/errors.h"
#include "common/window_policy.h"

namespace ringllama {
namespace {

// A daemon and workers in miniature: the slots, the reads in flight, the workers' own record of
// what they have copied (kept apart from the policy, so that the checks do not trust it).
class Sim {
 public:
  Sim(int64_t n_layers, int64_t cap, int64_t back_margin, int64_t n_slots = -1, int64_t cycle = 0)
      : policy({n_layers, cap, back_margin, cycle}), L(n_layers),
        slots(static_cast<size_t>(n_slots < 0 ? cap : n_slots)), label(slots.size(), -1) {}

  struct W {
    bool active = false;
    int64_t start = 0, next = 0;
  };

  // Re-plans, starts the loads and checks every rule; call after each event, as the daemon does.
  WindowPlan replan() {
    WindowPlan plan = policy.plan(slots);
    EXPECT_EQ(plan.start, policy.window_start());
    const std::vector<int64_t> window = policy.window_positions();
    EXPECT_EQ(static_cast<int64_t>(window.size()), std::min(policy.params().cpu_cap_layers, L));
    EXPECT_EQ(plan.end, window.back() + 1);
    for (int64_t l = L - policy.pinned_layers(); l < L; ++l)
      EXPECT_GE(policy.position_of_layer(l), 0) << "pinned layer " << l << " left the window";
    std::set<int64_t> layers;
    for (size_t s = 0; s < slots.size(); ++s) {
      int64_t p = plan.position[s];
      if (p < 0) continue;
      EXPECT_TRUE(p >= plan.start && p < plan.end && policy.in_window(p))
          << "slot " << s << " serves " << p << " outside the window";
      EXPECT_TRUE(layers.insert(p % L).second) << "two slots serve layer " << p % L;
    }
    for (const SlotLoad& ld : plan.loads) {
      auto& v = slots[static_cast<size_t>(ld.slot)];
      EXPECT_NE(v.fill, SlotFill::Loading) << "a slot in the middle of a read was chosen";
      EXPECT_EQ(ld.layer, ld.position % L);
      v.layer = ld.layer;
      v.fill = SlotFill::Loading;
      ++loads_per_layer[ld.layer];
      ++total_loads;
    }
    // The invariant: a slot that stops serving position P (reloaded, or moved on to another
    // position) may do so only when no active worker still has to copy P.
    for (size_t s = 0; s < slots.size(); ++s) {
      const int64_t old = label[s], now = plan.position[s];
      if (old >= 0 && now != old) {
        for (const auto& [id, w] : workers) {
          if (!w.active) continue;
          EXPECT_FALSE(old >= w.next && old < w.start + L)
              << "slot " << s << " left position " << old << " that worker " << id << " has not copied (next "
              << w.next << ", pass [" << w.start << ", " << w.start + L << "))";
        }
      }
      label[s] = now;
    }
    for (WorkerId id : policy.convoy()) {
      const W& w = workers.at(id);
      EXPECT_TRUE(w.active);
      EXPECT_LT(policy.position_of_layer(w.next % L), 0);
    }
    return plan;
  }

  void finish_loads(std::mt19937_64* rng) {
    for (auto& v : slots)
      if (v.fill == SlotFill::Loading && (!rng || (*rng)() % 2 == 0)) v.fill = SlotFill::Ready;
  }
  bool loads_in_flight() const {
    return std::any_of(slots.begin(), slots.end(), [](const SlotView& v) { return v.fill == SlotFill::Loading; });
  }
  // A worker copies its next layer from any ready slot that holds it.
  bool can_copy(const W& w) const {
    if (!w.active || w.next >= w.start + L) return false;
    return std::any_of(slots.begin(), slots.end(),
                       [&](const SlotView& v) { return v.fill == SlotFill::Ready && v.layer == w.next % L; });
  }

  void attach(WorkerId id) {
    policy.attach(id);
    workers[id] = W{};
  }
  void begin(WorkerId id) {
    int64_t start = policy.begin_pass(id);
    EXPECT_EQ(start % L, 0);
    EXPECT_GE(start, last_end[id]) << "a pass began before the worker's previous one ended";
    workers[id] = W{true, start, start};
  }
  void copy(WorkerId id) {
    W& w = workers[id];
    ASSERT_TRUE(can_copy(w));
    ++w.next;
    policy.progress(id, w.next);
  }
  void end(WorkerId id) {
    policy.end_pass(id);
    last_end[id] = workers[id].start + L;
    workers[id].active = false;
  }
  void detach(WorkerId id) {
    policy.detach(id);
    workers.erase(id);
  }

  WindowPolicy policy;
  int64_t L;
  std::vector<SlotView> slots;
  std::vector<int64_t> label;
  std::map<WorkerId, W> workers;
  std::map<WorkerId, int64_t> last_end;
  std::map<int64_t, int> loads_per_layer;
  int64_t total_loads = 0;
};

// Random events from 1-4 workers; the invariant is checked after each, and the system never
// stalls: while a pass is in flight, somebody can always copy, or a load is under way.
void run_random(int64_t L, int64_t cap, int64_t margin, int64_t n_slots, uint64_t seed, int steps,
                int64_t* passes_out = nullptr, Sim** keep = nullptr, int64_t cycle = 0) {
  static thread_local std::unique_ptr<Sim> holder;
  holder = std::make_unique<Sim>(L, cap, margin, n_slots, cycle);
  Sim& sim = *holder;
  std::mt19937_64 rng(seed);
  WorkerId next_id = 1;
  int64_t passes = 0;
  sim.attach(next_id++);
  sim.replan();
  for (int step = 0; step < steps; ++step) {
    const int r = static_cast<int>(rng() % 100);
    std::vector<WorkerId> ids;
    for (const auto& [id, w] : sim.workers) ids.push_back(id);
    const WorkerId pick = ids.empty() ? 0 : ids[rng() % ids.size()];
    if (r < 3 && sim.workers.size() < 4) {
      sim.attach(next_id++);
    } else if (r < 5 && !ids.empty() && (sim.workers.size() > 1 || rng() % 4 == 0)) {
      sim.detach(pick);  // dead or bye, in the middle of a pass or not
    } else if (r < 20 && pick && !sim.workers[pick].active) {
      sim.begin(pick);
    } else if (r < 35) {
      sim.finish_loads(&rng);
    } else if (pick && sim.workers[pick].active) {
      Sim::W& w = sim.workers[pick];
      if (w.next == w.start + L) {
        sim.end(pick);
        ++passes;
      } else if (sim.can_copy(w)) {
        sim.copy(pick);
      }
    }
    WindowPlan plan = sim.replan();
    if (::testing::Test::HasFailure()) {
      ADD_FAILURE() << "at step " << step << " (seed " << seed << ")";
      return;
    }
    // No stall: with a pass in flight, either a load is under way or some worker can move.
    bool any_active = false, any_moves = false;
    for (const auto& [id, w] : sim.workers) {
      any_active |= w.active;
      any_moves |= sim.can_copy(w) || (w.active && w.next == w.start + L);
    }
    if (any_active && !any_moves && !sim.loads_in_flight()) {
      ADD_FAILURE() << "stalled at step " << step << ": window [" << plan.start << ", " << plan.end << "), "
                    << plan.waiting << " positions waiting";
      return;
    }
  }
  if (passes_out) *passes_out = passes;
  if (keep) *keep = &sim;
}

TEST(WindowPolicyProperty, NeverEvictsWhatAnActiveWorkerHasNotCopied) {
  struct Case {
    int64_t L, cap, margin, slots;
  };
  const Case cases[] = {{8, 3, 0, 3},  {8, 3, 2, 3},  {8, 5, 4, 5},  {80, 12, 0, 12}, {80, 12, 4, 12},
                        {3, 2, 1, 2},  {1, 1, 0, 1},  {6, 6, 2, 6},  {5, 9, 3, 9},    {7, 1, 0, 1}};
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "L " << c.L << " cap " << c.cap << " margin " << c.margin);
    for (uint64_t seed = 1; seed <= 4; ++seed) {
      int64_t passes = 0;
      run_random(c.L, c.cap, c.margin, c.slots, seed * 7919 + static_cast<uint64_t>(c.L), 6000, &passes);
      if (::testing::Test::HasFailure()) return;
      EXPECT_GT(passes, 0) << "no pass ever finished";
    }
  }
}

TEST(WindowPolicyProperty, PinnedWindowNeverEvictsWhatAnActiveWorkerHasNotCopied) {
  struct Case {
    int64_t L, cap, margin;
  };
  const Case cases[] = {{12, 6, 0}, {12, 6, 1}, {40, 25, 0}, {40, 25, 2}, {8, 3, 0}, {5, 4, 1}, {7, 2, 0}};
  for (const Case& c : cases) {
    const int64_t cycle = default_cycle_slots(c.cap, c.margin);
    SCOPED_TRACE(::testing::Message() << "L " << c.L << " cap " << c.cap << " margin " << c.margin << " cycle "
                                      << cycle);
    for (uint64_t seed = 1; seed <= 4; ++seed) {
      int64_t passes = 0;
      run_random(c.L, c.cap, c.margin, c.cap, seed * 104729 + static_cast<uint64_t>(c.L), 12000, &passes, nullptr,
                 cycle);
      if (::testing::Test::HasFailure()) return;
      EXPECT_GT(passes, 0) << "no pass ever finished";
    }
  }
}

// One worker running pass after pass: once the window is warm, each pass reads n - C + k layers
// (the pinned C - k never again), where the ring of C slots reads all n.
int64_t layers_read_over_passes(int64_t L, int64_t cap, int64_t cycle, int passes, int64_t* warm_reads) {
  Sim sim(L, cap, 0, cap, cycle);
  sim.attach(1);
  sim.replan();
  int64_t reads_before_last = 0;
  for (int pass = 0; pass < passes; ++pass) {
    if (pass == passes - 1) reads_before_last = sim.total_loads;
    sim.begin(1);
    sim.replan();
    for (int64_t l = 0; l < L; ++l) {
      for (int guard = 0; !sim.can_copy(sim.workers[1]); ++guard) {
        EXPECT_LT(guard, 4) << "layer " << l << " of pass " << pass << " never came";
        if (guard >= 4) return -1;
        sim.finish_loads(nullptr);
        sim.replan();
      }
      sim.copy(1);
      sim.replan();
    }
    sim.end(1);
    sim.replan();
    sim.finish_loads(nullptr);
    sim.replan();
  }
  *warm_reads = sim.total_loads - reads_before_last;
  return sim.total_loads;
}

TEST(WindowPolicyProperty, PinnedWindowReadsNMinusCPlusKLayersPerPass) {
  struct Case {
    int64_t L, cap;
  };
  for (const Case& c : {Case{12, 6}, Case{80, 50}, Case{32, 12}, Case{8, 3}, Case{5, 4}}) {
    const int64_t k = default_cycle_slots(c.cap, 0);
    SCOPED_TRACE(::testing::Message() << "L " << c.L << " cap " << c.cap << " k " << k);
    int64_t pinned_warm = 0, ring_warm = 0;
    layers_read_over_passes(c.L, c.cap, k, 5, &pinned_warm);
    layers_read_over_passes(c.L, c.cap, 0, 5, &ring_warm);
    EXPECT_EQ(pinned_warm, c.L - c.cap + k);
    EXPECT_EQ(pinned_warm, layers_read_per_pass(WindowParams{c.L, c.cap, 0, k}));
    EXPECT_EQ(ring_warm, c.L) << "the ring re-reads every layer on every pass";
    EXPECT_EQ(layers_read_per_pass(WindowParams{c.L, c.cap, 0, 0}), c.L);
  }
  EXPECT_EQ(layers_read_per_pass(WindowParams{12, 12, 0, 2}), 0) << "a window that holds the model reads nothing";
  // Layers the GPU keeps resident take no slot: 8 of 32 resident, 12 slots, 2 cycling: the last 10
  // are pinned, 14 cycle.
  EXPECT_EQ(layers_read_per_pass(WindowParams{32, 12, 0, 2, 8}), 14);
  EXPECT_EQ(layers_read_per_pass(WindowParams{32, 24, 0, 2, 8}), 0) << "the 24 streamed layers fit";
}

TEST(WindowPolicy, PinsTheLastLayersAndCyclesTheFirstThroughTwoSlots) {
  WindowPolicy p({12, 6, 0, 2});
  EXPECT_EQ(p.pinned_layers(), 4);
  EXPECT_EQ(p.cycling_slots(), 2);
  p.attach(1);
  // Idle: the pinned layers 8..11 and the next pass's layers 0 and 1.
  EXPECT_EQ(p.window_positions(), (std::vector<int64_t>{0, 1, 8, 9, 10, 11}));
  EXPECT_EQ(p.begin_pass(1), 0);
  p.progress(1, 5);  // layers 0..4 copied: the cycling part is layers 5 and 6
  EXPECT_EQ(p.window_positions(), (std::vector<int64_t>{5, 6, 8, 9, 10, 11}));
  EXPECT_LT(p.position_of_layer(7), 0);
  EXPECT_TRUE(p.in_window(6));
  EXPECT_FALSE(p.in_window(7));
  p.progress(1, 9);  // in the pinned layers: the cycling part wraps to the next step's layers 0, 1
  EXPECT_EQ(p.window_positions(), (std::vector<int64_t>{9, 10, 11, 12, 13, 20}));
  EXPECT_EQ(p.position_of_layer(8), 20) << "a pinned layer serves its next position";
}

TEST(WindowPolicy, LayersBelowTheFirstTakeNoSlot) {
  WindowPolicy p({12, 6, 0, 2});
  p.set_first_layer(3);
  EXPECT_EQ(p.pinned_layers(), 4);
  p.attach(1);
  EXPECT_EQ(p.window_positions(), (std::vector<int64_t>{3, 4, 8, 9, 10, 11}));
  EXPECT_LT(p.position_of_layer(0), 0);
  p.set_first_layer(7);  // 5 layers read: all of them fit in 6 slots
  EXPECT_EQ(p.pinned_layers(), 5);
  EXPECT_EQ(p.cycling_slots(), 0);
  EXPECT_EQ(p.window_positions(), (std::vector<int64_t>{7, 8, 9, 10, 11}));
}

TEST(WindowPolicyProperty, FullResidencyLoadsEachLayerOnce) {
  for (auto [L, cap] : {std::pair<int64_t, int64_t>{5, 5}, {5, 8}, {1, 3}, {12, 12}}) {
    Sim* sim = nullptr;
    run_random(L, cap, 0, cap, 42 + static_cast<uint64_t>(L), 5000, nullptr, &sim);
    ASSERT_NE(sim, nullptr);
    EXPECT_EQ(static_cast<int64_t>(sim->loads_per_layer.size()), L);
    for (const auto& [layer, n] : sim->loads_per_layer) EXPECT_EQ(n, 1) << "layer " << layer;
    EXPECT_TRUE(sim->policy.convoy().empty());
    EXPECT_EQ(sim->policy.convoy_events(), 0u);
  }
}

TEST(WindowPolicy, PreloadsLayerZeroBeforeTheFirstPass) {
  Sim sim(8, 3, 0);
  WindowPlan plan = sim.replan();
  EXPECT_EQ(plan.start, 0);
  ASSERT_EQ(plan.loads.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(plan.loads[i].layer, i);  // most urgent first
    EXPECT_EQ(plan.loads[i].position, i);
  }
}

TEST(WindowPolicy, WrapsFromTheLastLayerToLayerZeroOfTheNextStep) {
  Sim sim(4, 3, 0);
  sim.attach(1);
  sim.replan();
  sim.finish_loads(nullptr);
  EXPECT_EQ(sim.policy.begin_pass(1), 0);
  sim.workers[1] = {true, 0, 0};
  sim.copy(1);
  sim.copy(1);  // copied layers 0 and 1: the window is [2, 5) = layers 2, 3 and layer 0 of step 1
  WindowPlan plan = sim.replan();
  EXPECT_EQ(plan.start, 2);
  // Layer 0's slot serves position 4 as it is; layer 1's slot is reused for layer 3.
  ASSERT_EQ(plan.loads.size(), 1u);
  EXPECT_EQ(plan.loads[0].layer, 3);
  EXPECT_EQ(plan.loads[0].position, 3);
  EXPECT_EQ(plan.position[0], 4);
  EXPECT_EQ(plan.loads[0].slot, 1);
  EXPECT_EQ(sim.total_loads, 4);
}

TEST(WindowPolicy, ASlotKeepsItsLayerAcrossSteps) {
  // cap 3 of 4 layers: after copying layer 0 the window is [1, 4); layer 0 leaves it, layer 3 comes.
  // Once layer 1 is copied, the window [2, 5) wants layer 0 again, at position 4.
  WindowPolicy w({4, 3, 0});
  std::vector<SlotView> slots = {{0, SlotFill::Ready}, {1, SlotFill::Ready}, {2, SlotFill::Ready}};
  w.attach(1);
  EXPECT_EQ(w.begin_pass(1), 0);
  w.progress(1, 1);
  WindowPlan plan = w.plan(slots);
  ASSERT_EQ(plan.loads.size(), 1u);
  EXPECT_EQ(plan.loads[0].slot, 0);
  EXPECT_EQ(plan.loads[0].layer, 3);
  EXPECT_EQ(plan.loads[0].position, 3);
  slots[0] = {3, SlotFill::Ready};
  w.progress(1, 2);
  plan = w.plan(slots);
  ASSERT_EQ(plan.loads.size(), 1u);
  EXPECT_EQ(plan.loads[0].slot, 1);
  EXPECT_EQ(plan.loads[0].layer, 0);
  EXPECT_EQ(plan.loads[0].position, 4);
  EXPECT_EQ(plan.position[0], 3);
  EXPECT_EQ(plan.position[2], 2);
}

TEST(WindowPolicy, ConvoyOfTwoWorkersAtDifferentPositions) {
  WindowPolicy w({8, 3, 0});
  w.attach(1);
  w.attach(2);
  EXPECT_EQ(w.begin_pass(1), 0);
  EXPECT_EQ(w.begin_pass(2), 0);
  w.progress(1, 1);
  w.progress(1, 2);
  w.progress(1, 3);  // worker 1 needs layer 3; worker 2 still needs layer 0: window [0, 3)
  EXPECT_EQ(w.window_start(), 0);
  EXPECT_EQ(w.convoy(), std::vector<WorkerId>{1});
  EXPECT_EQ(w.convoy_events(), 1u);
  w.progress(2, 1);  // window [1, 4): layer 3 is in
  EXPECT_TRUE(w.convoy().empty());
  w.progress(1, 4);
  w.progress(1, 5);  // needs layer 5 again outside [1, 4)
  EXPECT_EQ(w.convoy(), std::vector<WorkerId>{1});
  EXPECT_EQ(w.convoy_events(), 2u);
  // Worker 2 leaves: worker 1 alone sets the window.
  w.detach(2);
  EXPECT_EQ(w.window_start(), 5);
  EXPECT_TRUE(w.convoy().empty());
}

TEST(WindowPolicy, IdleWorkersHoldNothing) {
  WindowPolicy w({8, 3, 0});
  w.attach(1);
  w.attach(2);
  EXPECT_EQ(w.begin_pass(1), 0);
  for (int64_t p = 1; p <= 5; ++p) w.progress(1, p);
  // Worker 2 is attached but idle: only worker 1 sets the window.
  EXPECT_EQ(w.window_start(), 5);
  // Worker 2 rejoins at layer 0 of the next step, not behind the window.
  EXPECT_EQ(w.begin_pass(2), 8);
  EXPECT_EQ(w.window_start(), 5);
  w.end_pass(2);  // failed pass, say: idle again
  for (int64_t p = 6; p <= 8; ++p) w.progress(1, p);
  w.end_pass(1);
  // Nobody in a pass: layer 0.. of the next one. Worker 2's next pass is after its last (16).
  EXPECT_EQ(w.window_start(), 16);
  EXPECT_EQ(w.begin_pass(1), 16);
  EXPECT_EQ(w.begin_pass(2), 16);
}

TEST(WindowPolicy, DetachFreesTheWindow) {
  WindowPolicy w({8, 3, 0});
  w.attach(1);
  w.attach(2);
  w.begin_pass(1);
  w.begin_pass(2);
  for (int64_t p = 1; p <= 2; ++p) w.progress(2, p);
  w.progress(1, 1);
  EXPECT_EQ(w.window_start(), 1);
  w.detach(1);  // dead in the middle of its pass
  EXPECT_EQ(w.window_start(), 2);
  w.detach(2);
  EXPECT_EQ(w.window_start(), 8);  // layer 0.. of the next pass
  EXPECT_FALSE(w.attached(2));
}

TEST(WindowPolicy, BackMarginLetsALateWorkerJoinThePassInFlight) {
  WindowPolicy w({8, 4, 2});
  w.attach(1);
  w.attach(2);
  w.attach(3);
  EXPECT_EQ(w.begin_pass(1), 0);
  w.progress(1, 1);
  w.progress(1, 2);
  EXPECT_EQ(w.window_start(), 0);  // 2 - margin 2, layer 0 still held
  EXPECT_EQ(w.begin_pass(2), 0);
  w.progress(1, 3);
  EXPECT_EQ(w.window_start(), 0);  // worker 2 is at 0
  w.progress(2, 1);
  w.progress(2, 2);
  w.progress(2, 3);
  EXPECT_EQ(w.window_start(), 1);
  EXPECT_EQ(w.begin_pass(3), 8);   // layer 0 of this step is gone: the next step
}

TEST(WindowPolicy, LoadsNeverGoIntoASlotThatIsLoading) {
  WindowPolicy w({8, 2, 0});
  std::vector<SlotView> slots = {{5, SlotFill::Loading}, {6, SlotFill::Loading}};
  WindowPlan plan = w.plan(slots);  // wants layers 0 and 1; both slots busy with old reads
  EXPECT_TRUE(plan.loads.empty());
  EXPECT_EQ(plan.waiting, 2);
  slots[1].fill = SlotFill::Ready;
  plan = w.plan(slots);
  ASSERT_EQ(plan.loads.size(), 1u);
  EXPECT_EQ(plan.loads[0].slot, 1);
  EXPECT_EQ(plan.loads[0].layer, 0);
  EXPECT_EQ(plan.waiting, 1);
}

TEST(WindowPolicy, ASlotInErrorKeepsItsLayerWhileInTheWindow) {
  WindowPolicy w({8, 2, 0});
  std::vector<SlotView> slots = {{0, SlotFill::Error}, {-1, SlotFill::Empty}};
  WindowPlan plan = w.plan(slots);
  ASSERT_EQ(plan.loads.size(), 1u);
  EXPECT_EQ(plan.loads[0].layer, 1);
  EXPECT_EQ(plan.position[0], 0);
}

TEST(WindowPolicy, RefusesWhatCannotWork) {
  EXPECT_THROW(WindowPolicy({8, 3, 3}), ConfigError);  // back_margin must be < the window
  EXPECT_THROW(WindowPolicy({8, 0, 0}), ConfigError);
  EXPECT_THROW(WindowPolicy({0, 3, 0}), ConfigError);
  EXPECT_THROW(WindowPolicy({4, 9, 4}), ConfigError);  // the window is min(9, 4) = 4 slots
  WindowPolicy w({8, 3, 0});
  EXPECT_THROW(w.begin_pass(1), Error);  // not attached
  w.attach(1);
  EXPECT_THROW(w.attach(1), Error);
  EXPECT_THROW(w.progress(1, 1), Error);  // no pass
  w.begin_pass(1);
  EXPECT_THROW(w.begin_pass(1), Error);
  EXPECT_THROW(w.progress(1, 9), Error);  // past the pass
  w.progress(1, 3);
  EXPECT_THROW(w.progress(1, 2), Error);  // backwards
  EXPECT_THROW(w.plan(std::vector<SlotView>(2)), Error);  // fewer slots than the window
  w.end_pass(1);
  EXPECT_THROW(w.end_pass(1), Error);
  w.detach(1);
  EXPECT_THROW(w.detach(1), Error);
}

}  // namespace
}  // namespace ringllama
