// The CPU emulator's runtime: grid launch, CUDA threads as fibers, barriers and warp primitives,
// error detection (contract and model: cuda_runtime.h in this directory).
//
// Per OS thread (thread_local Worker): stacks for up to 1024 fibers (128 KiB each + a guard page,
// mapped once, touched lazily), the dynamic shared-memory buffer, the scheduler context. A block
// runs as: every fiber ready (thread order, or reversed / shuffled by UNIF2ACE_EMU_ORDER); the
// scheduler resumes the next ready fiber until it blocks (barrier, warp primitive) or exits.
// The last thread to arrive completes a barrier / warp primitive (computes every participant's
// result) and makes the waiters ready again. No ready fiber while some are alive = deadlock.
// Context switches: a 20-instruction stack switch on x86-64 (swapcontext costs a signal-mask
// system call, ~0.5 us), ucontext elsewhere.
#include <cuda_runtime.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__)
// Saves the callee-saved registers and the FP control words on the current stack, stores the
// stack pointer in *save_sp, switches to load_sp and restores what was saved there.
extern "C" void unif2ace_emu_switch(void** save_sp, void* load_sp);
#else
#include <ucontext.h>
#endif

namespace unif2ace::emu {
namespace {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = size_t(128) << 10;
constexpr int kDefaultSmemLimit = 48 << 10;
constexpr int kMaxSmemOptIn = 227 << 10;  // sm_90

// ------------------------------------------------------------------------------ contexts
#if defined(__x86_64__)
asm(R"(
  .text
  .p2align 4
  .hidden unif2ace_emu_switch
  .globl unif2ace_emu_switch
  .type unif2ace_emu_switch, @function
unif2ace_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size unif2ace_emu_switch, .-unif2ace_emu_switch
)");

struct Context {
  void* sp = nullptr;
};
void ctx_init(Context& c, char* stack, size_t size, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                  // entry sees rsp = 8 mod 16, as after a call
  *--sp = reinterpret_cast<uint64_t>(entry);  // popped by ret
  for (int i = 0; i < 6; ++i) *--sp = 0;      // rbp rbx r12-r15
  uint32_t csr[2] = {0, 0};
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  *--sp = (static_cast<uint64_t>(csr[1]) << 32) | csr[0];
  c.sp = sp;
}
inline void ctx_switch(Context& from, Context& to) { unif2ace_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void ctx_init(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
inline void ctx_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ------------------------------------------------------------------------------ state
enum class State : uint8_t { kReady, kBarrier, kWarp, kDone };

struct Fiber {
  Context ctx;
  ThreadCtx tc;
  State state;
  // where it waits (barrier or warp primitive) and the primitive's operands / result
  const char* file;
  int line;
  WarpOp op;
  unsigned mask;
  int arg, width;
  uint64_t value, result;
};

struct Worker {
  char* stacks = nullptr;
  size_t stride = 0;
  std::vector<Fiber> fibers;
  std::vector<int> ready;  // FIFO: ready[head..]
  size_t head = 0;
  std::vector<int> scratch;  // fibers to make ready (push_ready)
  // per warp of the running block: lanes that exist, have exited, wait in a warp primitive
  unsigned exists[kMaxThreads / 32], exited[kMaxThreads / 32], waiting[kMaxThreads / 32];
  std::vector<uint64_t> smem;  // dynamic shared memory (8-byte aligned words; 16-byte aligned base below)
  unsigned char* smem_base = nullptr;
  Context sched;
  // the running launch / block
  const void* kernel = nullptr;
  KernelThunk thunk = nullptr;
  void* params = nullptr;
  int nthreads = 0, live = 0, bar_arrived = 0;
  int active_waiting = 0;  // lanes waiting in __activemask()
  const char* bar_file = nullptr;
  int bar_line = 0;
  std::string error;
  int order = 0;  // 0 forward, 1 reverse, 2 random
  std::mt19937 rng;
  std::atomic<bool> expired{false};
};

thread_local Worker* tw = nullptr;   // this OS thread's emulator state
thread_local Fiber* tcur = nullptr;  // the running CUDA thread (null outside kernels)

// Process-wide state, never destroyed (the detached watchdog thread may outlive static destructors).
struct Watch {
  struct Worker* w;
  std::chrono::steady_clock::time_point start;
  double timeout_s;
  std::string kernel;
};
struct Globals {
  std::mutex mu;                          // guards everything below
  std::map<const void*, int> smem_limit;  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
  std::vector<Watch> watches;             // running launches
  std::condition_variable cv;
};
Globals& G() {
  static Globals* g = new Globals();
  return *g;
}

// ------------------------------------------------------------------------------ messages
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  return buf;
}

const char* short_path(const char* file) {  // ".../csrc/cuda/x.cuh" -> "csrc/cuda/x.cuh"
  const char* p = std::strstr(file, "csrc/");
  return p ? p : file;
}

std::string kernel_name(const void* kernel) {
  Dl_info info;
  if (dladdr(kernel, &info) && info.dli_sname) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string s = status == 0 && d ? d : info.dli_sname;
    std::free(d);
    return s;
  }
  return format("kernel at %p", kernel);
}

const char* op_name(WarpOp op) {
  // in the order of WarpOp (cuda_runtime.h)
  static constexpr const char* kNames[] = {
      "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync", "__ballot_sync",
      "__any_sync",  "__all_sync",     "__match_any_sync", "__syncwarp",      "__activemask",
  };
  static_assert(sizeof(kNames) / sizeof(kNames[0]) == static_cast<size_t>(WarpOp::kActivemask) + 1);
  return kNames[static_cast<int>(op)];
}

std::string where(const Fiber& f) {
  const auto& t = f.tc.tid;
  return format("thread (%u,%u,%u) [warp %d lane %d]", t.x, t.y, t.z, f.tc.linear / 32, f.tc.linear % 32);
}

std::string block_where(const Worker& w) {
  const ThreadCtx& c = w.fibers[0].tc;
  return format("kernel %s, block (%u,%u,%u) of grid (%u,%u,%u), blockDim (%u,%u,%u)", kernel_name(w.kernel).c_str(),
                c.bid.x, c.bid.y, c.bid.z, c.gdim.x, c.gdim.y, c.gdim.z, c.bdim.x, c.bdim.y, c.bdim.z);
}

// What every thread of the block is doing, threads with the same description folded into ranges.
std::string describe_block(const Worker& w) {
  std::string out;
  auto desc = [&](const Fiber& f) -> std::string {
    switch (f.state) {
      case State::kDone:
        return "exited";
      case State::kReady:
        return "ready";
      case State::kBarrier:
        return format("wait at __syncthreads() %s:%d", short_path(f.file), f.line);
      default:
        if (f.op == WarpOp::kActivemask) return format("wait at __activemask() %s:%d", short_path(f.file), f.line);
        return format("wait at %s(mask 0x%08x) %s:%d", op_name(f.op), f.mask, short_path(f.file), f.line);
    }
  };
  int i = 0;
  while (i < w.nthreads) {
    const std::string d = desc(w.fibers[i]);
    int j = i + 1;
    while (j < w.nthreads && desc(w.fibers[j]) == d) ++j;
    out += j - i == 1 ? format("\n  thread %d: ", i) : format("\n  threads %d-%d: ", i, j - 1);
    out += d;
    i = j;
  }
  return out;
}

// ------------------------------------------------------------------------------ scheduling
[[noreturn]] void fail(const std::string& msg);

Worker& worker() {
  if (tw == nullptr) {
    tw = new Worker();  // one per OS thread that launches kernels; lives as long as the thread
    tw->stride = kStackBytes + static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, tw->stride * kMaxThreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("CUDA emulator: cannot map fiber stacks");
    tw->stacks = static_cast<char*>(p);
    for (int i = 0; i < kMaxThreads; ++i) {  // guard page below each stack: overflow faults
      mprotect(tw->stacks + i * tw->stride, tw->stride - kStackBytes, PROT_NONE);
    }
    tw->fibers.resize(kMaxThreads);
    tw->ready.reserve(4 * kMaxThreads);
  }
  return *tw;
}

Fiber& me() {
  if (tcur == nullptr) throw std::runtime_error("CUDA emulator: device code called outside a kernel launch");
  return *tcur;
}

// Makes w.scratch's fibers ready, in the configured order.
void push_ready(Worker& w) {
  std::vector<int>& ids = w.scratch;
  if (w.order == 1) std::reverse(ids.begin(), ids.end());
  if (w.order == 2) std::shuffle(ids.begin(), ids.end(), w.rng);
  for (int i : ids) {
    w.fibers[i].state = State::kReady;
    w.ready.push_back(i);
  }
  ids.clear();
}

void yield() {
  Worker& w = *tw;
  ctx_switch(tcur->ctx, w.sched);
}

[[noreturn]] void fail(const std::string& msg) {
  Worker& w = *tw;
  w.error = "CUDA emulator: " + msg + "\n(" + block_where(w) + ")" + describe_block(w);
  ctx_switch(tcur->ctx, w.sched);  // never resumed
  __builtin_unreachable();
}

// __activemask(): the lanes of `warp` waiting in it get their set once no other live lane of the
// warp can still join (every one has exited or blocked at another synchronisation).
void try_complete_active(Worker& w, int warp) {
  if (w.active_waiting == 0) return;
  const int base = warp * 32;
  unsigned waiting = 0;
  for (int j = 0; j < 32 && base + j < w.nthreads; ++j) {
    const Fiber& f = w.fibers[base + j];
    if (f.state == State::kReady) return;  // may still arrive
    if (f.state == State::kWarp && f.op == WarpOp::kActivemask) waiting |= 1u << j;
  }
  if (waiting == 0) return;
  for (int j = 0; j < 32; ++j) {
    if ((waiting >> j) & 1u) {
      w.fibers[base + j].result = waiting;
      w.scratch.push_back(base + j);
    }
  }
  w.active_waiting -= __builtin_popcount(waiting);
  w.waiting[warp] &= ~waiting;
  push_ready(w);
}

void release_barrier(Worker& w) {
  for (int i = 0; i < w.nthreads; ++i) {
    if (w.fibers[i].state == State::kBarrier) w.scratch.push_back(i);
  }
  w.bar_arrived = 0;
  push_ready(w);
}

[[noreturn]] void fiber_exit() {
  Worker& w = *tw;
  Fiber& f = *tcur;
  f.state = State::kDone;
  --w.live;
  const int warp = f.tc.linear / 32, lane = f.tc.linear % 32;
  w.exited[warp] |= 1u << lane;
  for (unsigned m = w.waiting[warp]; m != 0; m &= m - 1) {  // a primitive waiting for this lane cannot complete
    const int j = __builtin_ctz(m), t = warp * 32 + j;
    if ((w.fibers[t].mask >> lane) & 1u) {
      fail(format("%s exited while lane %d waits for it in %s(mask 0x%08x) at %s:%d", where(f).c_str(), j,
                  op_name(w.fibers[t].op), w.fibers[t].mask, short_path(w.fibers[t].file), w.fibers[t].line));
    }
  }
  if (w.bar_arrived > 0 && w.bar_arrived == w.live) release_barrier(w);
  try_complete_active(w, warp);
  ctx_switch(f.ctx, w.sched);  // never resumed
  __builtin_unreachable();
}

void fiber_entry() {
  Worker& w = *tw;
  w.thunk(w.kernel, w.params);
  fiber_exit();
}

// PTX shfl.sync source lane (c = ((32 - width) << 8) | clamp); -1: the caller's own value.
int shfl_source(WarpOp op, int lane, int b, int width) {
  const int seg = (32 - width) & 31;
  const int min_lane = lane & seg;
  const int max_lane = op == WarpOp::kShflUp ? (lane & seg) : ((lane & seg) | (31 & ~seg));
  int j;
  bool ok;
  switch (op) {
    case WarpOp::kShflUp:
      j = lane - b;
      ok = j >= max_lane;
      break;
    case WarpOp::kShflDown:
      j = lane + b;
      ok = j <= max_lane;
      break;
    case WarpOp::kShflXor:
      j = lane ^ b;
      ok = j <= max_lane;
      break;
    default:
      j = min_lane | (b & 31 & ~seg);
      ok = j <= max_lane;
      break;
  }
  return ok ? j : -1;
}

void complete_warp_op(Worker& w, int warp, unsigned mask) {
  const int base = warp * 32;
  const WarpOp op = w.fibers[base + __builtin_ctz(mask)].op;
  unsigned vote = 0;
  for (unsigned m = mask; m != 0; m &= m - 1) {
    const int j = __builtin_ctz(m);
    vote |= (w.fibers[base + j].value != 0 ? 1u : 0u) << j;
  }
  for (unsigned m = mask; m != 0; m &= m - 1) {
    const int j = __builtin_ctz(m);
    Fiber& f = w.fibers[base + j];
    switch (op) {
      case WarpOp::kShflIdx:
      case WarpOp::kShflUp:
      case WarpOp::kShflDown:
      case WarpOp::kShflXor: {
        const int src = shfl_source(op, j, f.arg, f.width);
        if (src < 0) {
          f.result = f.value;
        } else if ((mask >> src) & 1u) {
          f.result = w.fibers[base + src].value;
        } else {
          f.result = ~uint64_t(0);  // source lane not in the mask: undefined on the GPU
        }
        break;
      }
      case WarpOp::kBallot:
        f.result = vote;
        break;
      case WarpOp::kAny:
        f.result = vote != 0;
        break;
      case WarpOp::kAll:
        f.result = vote == mask;
        break;
      case WarpOp::kMatchAny: {
        unsigned same = 0;
        for (unsigned r = mask; r != 0; r &= r - 1) {
          const int k = __builtin_ctz(r);
          if (w.fibers[base + k].value == f.value) same |= 1u << k;
        }
        f.result = same;
        break;
      }
      default:
        f.result = 0;
        break;
    }
    w.scratch.push_back(base + j);
  }
  w.waiting[warp] &= ~mask;
  push_ready(w);
}

bool is_shuffle(WarpOp op) {
  return op == WarpOp::kShflIdx || op == WarpOp::kShflUp || op == WarpOp::kShflDown || op == WarpOp::kShflXor;
}

// ------------------------------------------------------------------------------ watchdog
// A launch longer than the timeout is flagged (the scheduler raises at its next switch); one
// whose thread never yields (an endless loop without synchronisation) cannot be interrupted and
// aborts the process after a grace period, with a message, instead of hanging the test run.
void watchdog_loop() {
  Globals& g = G();
  std::unique_lock<std::mutex> lk(g.mu);
  for (;;) {
    g.cv.wait_for(lk, std::chrono::milliseconds(200));
    const auto now = std::chrono::steady_clock::now();
    for (const Watch& wa : g.watches) {
      const double s = std::chrono::duration<double>(now - wa.start).count();
      if (s > wa.timeout_s) wa.w->expired.store(true);
      if (s > wa.timeout_s + 30.0) {
        std::fprintf(stderr,
                     "CUDA emulator: %s has not yielded for %.0f s (a thread loops without reaching a barrier or "
                     "warp primitive?); aborting\n",
                     wa.kernel.c_str(), s);
        std::fflush(stderr);
        std::abort();
      }
    }
  }
}

struct WatchGuard {
  Worker* w;
  WatchGuard(Worker* wk, double timeout_s, const void* kernel) : w(wk) {
    static std::once_flag once;
    std::call_once(once, [] { std::thread(watchdog_loop).detach(); });
    w->expired.store(false);
    std::string name = kernel_name(kernel);
    std::lock_guard<std::mutex> lk(G().mu);
    G().watches.push_back(Watch{w, std::chrono::steady_clock::now(), timeout_s, std::move(name)});
  }
  ~WatchGuard() {
    std::lock_guard<std::mutex> lk(G().mu);
    auto& ws = G().watches;
    ws.erase(std::remove_if(ws.begin(), ws.end(), [&](const Watch& x) { return x.w == w; }), ws.end());
  }
};

double env_double(const char* name, double dflt) {
  const char* s = std::getenv(name);
  return s && *s ? std::atof(s) : dflt;
}

}  // namespace

// ------------------------------------------------------------------------------ device-side API
ThreadCtx& current() { return me().tc; }

void* dynamic_shared_base() {
  me();
  return tw->smem_base;
}

unsigned active_mask(const char* file, int line) {
  Fiber& f = me();
  Worker& w = *tw;
  f.op = WarpOp::kActivemask;
  f.mask = 0;  // names no lane: never waited for by a warp primitive
  f.file = file;
  f.line = line;
  f.state = State::kWarp;
  w.waiting[f.tc.linear / 32] |= 1u << (f.tc.linear % 32);
  ++w.active_waiting;
  try_complete_active(w, f.tc.linear / 32);
  yield();
  return static_cast<unsigned>(f.result);
}

void syncthreads(const char* file, int line) {
  Fiber& f = me();
  Worker& w = *tw;
  if (w.bar_arrived == 0) {
    w.bar_file = file;
    w.bar_line = line;
  } else if (line != w.bar_line || std::strcmp(file, w.bar_file) != 0) {
    f.file = file;
    f.line = line;
    fail(format("divergent __syncthreads(): %s reached the barrier at %s:%d while other threads wait at %s:%d",
                where(f).c_str(), short_path(file), line, short_path(w.bar_file), w.bar_line));
  }
  f.state = State::kBarrier;
  f.file = file;
  f.line = line;
  if (++w.bar_arrived == w.live) release_barrier(w);
  try_complete_active(w, f.tc.linear / 32);
  yield();
}

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
  Fiber& f = me();
  Worker& w = *tw;
  const int warp = f.tc.linear / 32, lane = f.tc.linear % 32, base = warp * 32;
  const char* name = op_name(op);
  if (!((mask >> lane) & 1u)) {
    fail(format("%s at %s:%d: the calling %s is not in mask 0x%08x", name, short_path(file), line, where(f).c_str(),
                mask));
  }
  if (is_shuffle(op)) {
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
      fail(format("%s at %s:%d: width %d is not a power of two in [1, 32]", name, short_path(file), line, width));
    }
    if (op != WarpOp::kShflIdx && (arg < 0 || arg > 31)) {
      fail(format("%s at %s:%d: lane offset %d outside [0, 31] (not emulated)", name, short_path(file), line, arg));
    }
  }
  if (mask & ~w.exists[warp]) {
    fail(format("%s at %s:%d: mask 0x%08x names lane %d of warp %d, which does not exist (%d threads per block)", name,
                short_path(file), line, mask, __builtin_ctz(mask & ~w.exists[warp]), warp, w.nthreads));
  }
  if (mask & w.exited[warp]) {
    fail(format("%s at %s:%d: mask 0x%08x names lane %d of warp %d, which has exited", name, short_path(file), line,
                mask, __builtin_ctz(mask & w.exited[warp]), warp));
  }
  f.op = op;
  f.mask = mask;
  f.arg = arg;
  f.width = width;
  f.value = value;
  f.file = file;
  f.line = line;
  f.state = State::kWarp;
  w.waiting[warp] |= 1u << lane;
  if ((w.waiting[warp] & mask) == mask) {
    // every lane of the mask waits: they must all be in this primitive with this mask (lanes stuck
    // in different primitives that never all arrive end as a deadlock, listed per thread)
    for (unsigned m = mask & ~(1u << lane); m != 0; m &= m - 1) {
      const int j = __builtin_ctz(m);
      const Fiber& o = w.fibers[base + j];
      if (o.op != op || o.mask != mask || (is_shuffle(op) && o.width != width)) {
        fail(format(
            "lanes %d and %d of warp %d meet at different warp primitives: %s(mask 0x%08x) at %s:%d and "
            "%s(mask 0x%08x) at %s:%d",
            lane, j, warp, name, mask, short_path(file), line, op_name(o.op), o.mask, short_path(o.file), o.line));
      }
    }
    complete_warp_op(w, warp, mask);
  }
  try_complete_active(w, warp);
  yield();
  return f.result;
}

cudaError_t set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > kMaxSmemOptIn) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lk(G().mu);
  G().smem_limit[kernel] = bytes;
  return cudaSuccess;
}

// ------------------------------------------------------------------------------ launch
void run_grid(const void* kernel, KernelThunk thunk, void* params, dim3 grid, dim3 block, size_t smem) {
  if (tcur != nullptr) throw std::runtime_error("CUDA emulator: kernel launch from device code is not supported");
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (grid.x < 1 || grid.x > 0x7fffffffu || grid.y < 1 || grid.y > 65535 || grid.z < 1 || grid.z > 65535 ||
      block.x < 1 || block.x > 1024 || block.y < 1 || block.y > 1024 || block.z < 1 || block.z > 64 ||
      nthreads > kMaxThreads) {
    throw std::runtime_error(
        format("CUDA emulator: invalid configuration argument launching %s: grid (%u,%u,%u), "
               "block (%u,%u,%u) (CUDA: cudaErrorInvalidConfiguration)",
               kernel_name(kernel).c_str(), grid.x, grid.y, grid.z, block.x, block.y, block.z));
  }
  int limit = kDefaultSmemLimit;
  {
    std::lock_guard<std::mutex> lk(G().mu);
    auto it = G().smem_limit.find(kernel);
    if (it != G().smem_limit.end()) limit = std::max(limit, it->second);
  }
  if (smem > static_cast<size_t>(limit)) {
    throw std::runtime_error(format(
        "CUDA emulator: %s launched with %zu bytes of dynamic shared memory, over its limit of %d (48 KiB unless "
        "raised with cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize), 227 KiB at most on sm_90; "
        "CUDA: cudaErrorInvalidValue)",
        kernel_name(kernel).c_str(), smem, limit));
  }
  Worker& w = worker();
  const char* order = std::getenv("UNIF2ACE_EMU_ORDER");
  w.order = !order || !*order || !std::strcmp(order, "forward") ? 0 : !std::strcmp(order, "reverse") ? 1 : 2;
  if (w.order == 2 && std::strcmp(order, "random") != 0) {
    throw std::runtime_error(std::string("UNIF2ACE_EMU_ORDER must be forward, reverse or random, got ") + order);
  }
  w.rng.seed(static_cast<unsigned>(env_double("UNIF2ACE_EMU_SEED", 0)));
  w.smem.assign((smem + 16) / 8 + 1, 0);
  w.smem_base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(w.smem.data()) + 15) & ~uintptr_t(15));
  w.kernel = kernel;
  w.thunk = thunk;
  w.params = params;
  w.nthreads = static_cast<int>(nthreads);
  WatchGuard watch(&w, env_double("UNIF2ACE_EMU_TIMEOUT_S", 120.0), kernel);
  std::vector<int> ids(w.nthreads);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(w.smem_base, 0xff, smem);  // uninitialised shared memory reads as NaN / -1
        for (int i = 0; i < w.nthreads; ++i) {
          Fiber& f = w.fibers[i];
          f.tc.tid = uint3{i % block.x, i / block.x % block.y, i / (block.x * block.y)};
          f.tc.bid = uint3{bx, by, bz};
          f.tc.bdim = block;
          f.tc.gdim = grid;
          f.tc.linear = i;
          f.file = "";
          f.line = 0;
          ctx_init(f.ctx, w.stacks + i * w.stride + (w.stride - kStackBytes), kStackBytes, fiber_entry);
          ids[i] = i;
        }
        w.ready.clear();
        w.head = 0;
        w.live = w.nthreads;
        w.bar_arrived = 0;
        w.active_waiting = 0;
        for (int k = 0; k < (w.nthreads + 31) / 32; ++k) {
          const int n = std::min(32, w.nthreads - 32 * k);
          w.exists[k] = n == 32 ? ~0u : (1u << n) - 1u;
          w.exited[k] = w.waiting[k] = 0;
        }
        w.error.clear();
        w.scratch = ids;
        push_ready(w);
        while (w.live > 0 && w.error.empty()) {
          if (w.head == w.ready.size()) {
            w.error = "CUDA emulator: deadlock: no thread can proceed\n(" + block_where(w) + ")" + describe_block(w);
            break;
          }
          if (w.expired.load(std::memory_order_relaxed)) {
            w.error = format(
                          "CUDA emulator: timeout: the launch ran for more than UNIF2ACE_EMU_TIMEOUT_S = %.0f s "
                          "(livelock, or a shape too large to emulate)\n(",
                          env_double("UNIF2ACE_EMU_TIMEOUT_S", 120.0)) +
                      block_where(w) + ")" + describe_block(w);
            break;
          }
          tcur = &w.fibers[w.ready[w.head++]];
          if (w.head > 2 * kMaxThreads) {  // compact the FIFO
            w.ready.erase(w.ready.begin(), w.ready.begin() + static_cast<std::ptrdiff_t>(w.head));
            w.head = 0;
          }
          ctx_switch(w.sched, tcur->ctx);
          tcur = nullptr;
        }
        if (!w.error.empty()) {
          std::string msg;
          msg.swap(w.error);
          throw std::runtime_error(msg);
        }
      }
    }
  }
}

}  // namespace unif2ace::emu
