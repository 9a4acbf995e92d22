// Which layers the shared-memory window holds (DESIGN.md "The ring window"). A pure unit: no I/O,
// no clock. The daemon tells it what the workers do and what the slots hold; it answers which
// position each slot should hold and which slots to load now.
//
// Positions are absolute: step * n_layers + layer, so layer n_layers - 1 is followed by layer 0 of
// the next step. The window is [start, start + cap) with cap = min(cpu_cap_layers, n_layers):
//
//   start = max(p_min - back_margin, pass start of the worker at p_min), never moving backwards,
//
// where p_min is the lowest position not yet copied by a worker with a pass in flight. With no pass
// in flight the window is layer 0.. of the next pass, so a pass that begins finds it loaded.
// A pass begins at the first layer 0 at or after the window's start (and after the worker's own
// previous pass): layer 0 of the pass in flight while back_margin still holds it, else of the next
// step. Since the start never moves backwards and every pass begins inside or after the window,
// a position that leaves the window has been copied by every worker that needs it: a slot holding
// a position some active worker has not copied is never reused.
//
// Slots hold layers: the bytes of layer l are the same at every step, so a slot that holds layer l
// serves every position p with p % n_layers == l. With cpu_cap_layers >= n_layers every layer is
// in the window for good: each is loaded once and never evicted.
//
// When the model does not fit (cap < n_layers), a ring of cap slots re-reads every layer on every
// pass: a cyclic scan longer than the cache never hits. So the window pins the last
// cap - cycle_slots layers for good and cycles the others through cycle_slots slots: per pass the
// disk reads n_layers - cap + cycle_slots layers instead of n_layers. The pinned layers are in the
// window at every position; the cycling part is the first cycle_slots positions of cycling layers
// at or after the window's start, and follows the same start rule as the ring (so every guarantee
// above holds for it). The last layers are the ones pinned because GPUs keep the first ones
// resident, and because while a pass runs through them the cycling slots already fill with the
// next pass's first layers. cycle_slots 0, or >= cap, is the plain ring; default_cycle_slots()
// gives the daemon's and the local window's choice. Layers below first_layer are read by nobody
// (resident on the only GPU the window feeds): they take no slot and are never in the window.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

namespace ringllama {

using WorkerId = uint64_t;

struct WindowParams {
  int64_t n_layers = 0;        // layers of the model
  int64_t cpu_cap_layers = 0;  // slots
  int64_t back_margin = 0;     // positions kept behind p_min, < cpu_cap_layers
  int64_t cycle_slots = 0;     // cap < n_layers: slots that cycle the layers not pinned; 0 = a ring
  int64_t first_layer = 0;     // layers below it are read by nobody
  void validate() const;       // throws ConfigError naming the rule
};

// Two slots ahead of the slowest worker (one it copies from, one the disk fills) plus back_margin:
// enough to keep the disk busy, every other slot pins a layer. The whole cap where it is smaller.
int64_t default_cycle_slots(int64_t cpu_cap_layers, int64_t back_margin);

// Layers read from disk per pass, once the window is warm: 0 when every layer fits, else the
// layers that are not pinned.
int64_t layers_read_per_pass(const WindowParams& p);

// What a slot of the segment holds, as the daemon sees it.
enum class SlotFill { Empty, Loading, Ready, Error };

struct SlotView {
  int64_t layer = -1;          // -1: nothing
  SlotFill fill = SlotFill::Empty;
};

struct SlotLoad {
  int64_t slot = 0;
  int64_t layer = 0;
  int64_t position = 0;        // the window position it is loaded for
};

struct WindowPlan {
  int64_t start = 0;                  // the window: [start, end)
  int64_t end = 0;
  std::vector<int64_t> position;      // per slot: the position it serves, -1 none
  std::vector<SlotLoad> loads;        // to start now, most urgent first
  int64_t waiting = 0;                // window positions neither held nor loadable yet (slots busy loading)
};

struct WorkerView {
  WorkerId id = 0;
  bool active = false;         // a pass in flight
  int64_t pass_start = 0;      // first position of the pass (layer 0)
  int64_t next = 0;            // lowest position of the pass not yet copied
  int64_t next_pass_min = 0;   // its next pass begins at or after this (end of the last one)
};

class WindowPolicy {
 public:
  explicit WindowPolicy(const WindowParams& p);

  const WindowParams& params() const { return p_; }
  int64_t cap() const { return cap_; }  // slots in use: min(cpu_cap_layers, n_layers)
  int64_t pinned_layers() const { return p_.n_layers - pinned_from_; }  // [pinned_from, n) stay for good
  int64_t cycling_slots() const { return pinned_from_ > p_.first_layer ? cap_ - pinned_layers() : 0; }
  // From now on layers below `first` are read by nobody (the only consumer keeps them resident).
  void set_first_layer(int64_t first);

  // Workers. Unknown ids and impossible transitions throw Error (they come from a peer).
  void attach(WorkerId id);
  int64_t begin_pass(WorkerId id);                // returns the pass's first position
  void progress(WorkerId id, int64_t next);       // positions below `next` of this pass are copied
  void end_pass(WorkerId id);                     // all copied; idle, holding nothing
  void detach(WorkerId id);                       // gone (dead or bye): holds nothing
  bool attached(WorkerId id) const { return workers_.count(id) != 0; }
  const WorkerView& worker(WorkerId id) const;
  std::vector<WorkerView> workers() const;

  // The window now: cap positions from start on (with pinned layers not all contiguous), the
  // last one below window_end().
  int64_t window_start() const { return start_; }
  int64_t window_end() const;
  bool in_window(int64_t position) const;
  // The window's positions, lowest (most urgent) first.
  std::vector<int64_t> window_positions() const;
  // The position in the window that layer `layer` serves, or -1.
  int64_t position_of_layer(int64_t layer) const;

  // Given what the slots hold, which position each serves and which to load now. A slot that is
  // loading is never chosen (its read cannot be called back); a slot in error keeps its layer
  // while the layer is in the window (the daemon decides about retrying by emptying it).
  WindowPlan plan(const std::vector<SlotView>& slots) const;

  // Active workers whose next position's layer is not in the window: they wait for slower ones.
  std::vector<WorkerId> convoy() const;
  // Times a worker started waiting that way (counted on each change of state).
  uint64_t convoy_events() const { return convoy_events_; }

 private:
  WorkerView& get(WorkerId id, const char* what);
  void update();  // recompute the window start and the convoy count

  WindowParams p_;
  int64_t cap_ = 0;
  void size_parts();  // pinned_from_ from cap, cycle_slots and first_layer
  int64_t pinned_from_ = 0;  // layers [first_layer, pinned_from_) cycle, [pinned_from_, n) are pinned
  int64_t start_ = 0;
  std::map<WorkerId, WorkerView> workers_;
  std::map<WorkerId, bool> in_convoy_;
  uint64_t convoy_events_ = 0;
};

}  // namespace ringllama
