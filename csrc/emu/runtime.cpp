// The CUDA emulator's runtime: block scheduler (threads as fibers), barriers,
// warp operations, shared memory with its shadow state, cp.async, WMMA /
// ldmatrix / mma.sync, launches, the emulated device, and the memory-access
// callbacks that the instrumented kernels call.
//
// This file is compiled WITHOUT -fsanitize=thread: it implements the
// __tsan_* entry points that gcc's ThreadSanitizer instrumentation inserts
// into the kernels' translation units (before every load and store), and it
// must not call them itself.  libtsan is never linked.  See README.md.
#include "emu/emu.h"

#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda_runtime.h"

namespace sslops {
namespace emu {
namespace {

constexpr int kWarp = 32;
constexpr size_t kGuard = 4096;          // guard bytes around the dynamic shared memory
constexpr size_t kInnerGuard = 256;      // between static shared variables
constexpr size_t kMaxDynamic = 256 * 1024;
constexpr size_t kMaxStatic = 64 * 1024;
constexpr size_t kArenaCap = kGuard + kMaxDynamic + kGuard + kMaxStatic + kGuard;
constexpr size_t kDefaultSmemLimit = 48 * 1024;
constexpr uint16_t kMultiWarp = 0xffff;

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

const char* base_name(const char* path) {
  const char* s = std::strrchr(path, '/');
  return s ? s + 1 : path;
}
std::string site(const char* file, int line) { return fmt("%s:%d", base_name(file), line); }

// ---------------------------------------------------------------------------
// Context switching
// ---------------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" void sslops_emu_switch(void** save_sp, void* to_sp);
extern "C" void sslops_emu_fiber_start();
asm(R"(
  .text
  .p2align 4
  .globl sslops_emu_switch
  .hidden sslops_emu_switch
  .type sslops_emu_switch, @function
sslops_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size sslops_emu_switch, .-sslops_emu_switch

  .p2align 4
  .globl sslops_emu_fiber_start
  .hidden sslops_emu_fiber_start
  .type sslops_emu_fiber_start, @function
sslops_emu_fiber_start:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  andq $-16, %rsp
  callq *%rbx
  ud2
  .cfi_endproc
  .size sslops_emu_fiber_start, .-sslops_emu_fiber_start
)");

// A fresh fiber stack whose first switch "returns" into fn(arg).
void* init_stack(char* top, void (*fn)(void*), void* arg) {
  const uintptr_t t = reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(t - 88);
  uint32_t mxcsr = 0;
  uint16_t fpcw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  sp[0] = fpcw;
  sp[1] = mxcsr;
  sp[2] = sp[3] = sp[4] = 0;                 // r15 r14 r13
  sp[5] = reinterpret_cast<uint64_t>(arg);   // r12
  sp[6] = reinterpret_cast<uint64_t>(fn);    // rbx
  sp[7] = 0;                                 // rbp
  sp[8] = reinterpret_cast<uint64_t>(&sslops_emu_fiber_start);
  return sp;
}
inline void switch_to(void** save, void* to) { sslops_emu_switch(save, to); }
#else
#error "the sslops CUDA emulator's fibers are implemented for x86-64 only"
#endif

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------
enum class St : uint8_t { kReady, kBarrier, kWarp, kExited };

enum WarpKind : int { kWSyncwarp, kWShfl, kWVote, kWWmmaLoad, kWWmmaStore, kWWmmaMma, kWLdmatrix, kWMma };
const char* const kWarpKindName[] = {"__syncwarp", "a warp shuffle", "a warp vote", "wmma::load_matrix_sync",
                                     "wmma::store_matrix_sync", "wmma::mma_sync", "ldmatrix", "mma.sync"};
const char* const kShflName[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};

struct ShflPayload {
  int mode, arg, width;
  uint64_t in, out;
};
struct VotePayload {
  int kind;
  bool is_signed;
  uint64_t in, out;
};
struct WmmaMemPayload {
  FragDesc f;
  const void* ptr;
  unsigned ldm;
  bool col;
};
struct WmmaMmaPayload {
  FragDesc d, a, b, c;
};
struct LdmatrixPayload {
  int count;
  bool trans;
  uint32_t* regs;
  const void* ptr;
};
struct MmaPayload {
  MmaType type;
  float* d;
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
};

struct Copy {
  char* dst;
  const char* src;
  int bytes, src_bytes, group;
};

struct Stack {
  char* map = nullptr;  // guard page + stack
  size_t map_size = 0;
  char* lo = nullptr;   // usable stack [lo, lo + size)
  size_t size = 0;
};

struct Fiber {
  // fast-path fields first (read by every instrumented access)
  uintptr_t stack_lo = 0;
  size_t stack_size = 0;
  void* sp = nullptr;
  int tid = 0;
  uint3 idx{0, 0, 0};
  St st = St::kReady;
  const char* file = "";
  int line = 0;
  int bar_result = 0;
  int wkind = 0;
  unsigned wmask = 0;
  void* payload = nullptr;
  std::vector<Copy> copies;
  int groups = 0;  // committed cp.async groups
};

struct Range {
  uintptr_t lo, hi;
};

struct LaunchCtx {
  LaunchDesc d;
  std::string name;
  int nthreads = 0;
  size_t dyn = 0;
  size_t smem_limit = 0;  // static + dynamic
  bool check_global = false;
  std::vector<Range> dev;      // device memory of the op (sorted, merged)
  std::vector<Range> statics;  // the kernel module's loaded segments
  Range frame{0, 0};
};

// Shadow state of one byte of shared memory.
struct Cell {
  uint32_t w_epoch;  // barrier interval of the last write (0: never written)
  uint32_t r_epoch;  // interval of the reads recorded below
  uint32_t w_gen;    // warp-sync generation of the writer's warp at the write
  uint32_t r_gen;    // latest warp-sync generation among the recorded reads
  uint32_t r_mask;   // lanes of r_warp that read in r_epoch
  uint16_t w_tid;
  uint16_t r_warp;   // warp of the readers, kMultiWarp for several warps
  uint16_t pend;     // tid + 1 of a cp.async in flight into this byte, 0 if none
  uint16_t pad;
};

struct Region {
  std::string name;
  size_t off, size;
  const void* tag;
};

struct Worker {
  void* sched_sp = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Stack> stacks;
  char* arena = nullptr;
  std::vector<Cell> shadow;
  std::vector<int16_t> owner;  // region index per arena byte, -1: guard
  size_t used = 0;             // arena bytes in use (shadow/owner valid below)
  size_t static_cursor = 0, static_bytes = 0;
  std::vector<Region> regions;  // [0]: dynamic shared memory
  // the block being run
  const LaunchCtx* L = nullptr;
  uint3 bidx{0, 0, 0};
  int n = 0;
  uint32_t epoch = 1;
  std::vector<std::vector<unsigned>> wsyncs;  // per warp: masks of completed warp syncs this interval
  int at_barrier = 0, exited = 0;
  const char* bar_file = "";
  int bar_line = 0, bar_kind = 0, bar_acc = 0;
  bool failed = false;
  std::string error;
};

thread_local Worker* tls_worker = nullptr;
thread_local Fiber* tls_fiber __attribute__((tls_model("initial-exec"))) = nullptr;

size_t stack_bytes() {
  static const size_t s = [] {
    const char* v = std::getenv("SSLOPS_EMU_STACK_KB");
    const long kb = v ? std::atol(v) : 128;
    return static_cast<size_t>(std::max(16L, kb)) * 1024;
  }();
  return s;
}

Worker& worker() {
  if (tls_worker == nullptr) {
    auto* w = new Worker();  // one per OS thread, kept for the process
    void* a = mmap(nullptr, kArenaCap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(a != MAP_FAILED, "sslops emulator: cannot map shared memory");
    w->arena = static_cast<char*>(a);
    w->shadow.resize(kArenaCap);
    w->owner.assign(kArenaCap, -1);
    tls_worker = w;
  }
  return *tls_worker;
}

void ensure_fibers(Worker& w, int n) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (static_cast<int>(w.stacks.size()) < n) {
    Stack s;
    s.size = stack_bytes();
    s.map_size = s.size + page;
    void* m = mmap(nullptr, s.map_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(m != MAP_FAILED, "sslops emulator: cannot map a fiber stack");
    mprotect(m, page, PROT_NONE);  // guard page below the stack
    s.map = static_cast<char*>(m);
    s.lo = s.map + page;
    w.stacks.push_back(s);
  }
  if (static_cast<int>(w.fibers.size()) < n) w.fibers.resize(n);
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------
std::string where_prefix(const Worker& w, const Fiber* f) {
  std::string s = "sslops CUDA emulator: kernel " + w.L->name + " (launched from " + w.L->d.where + "), block (" +
                  std::to_string(w.bidx.x) + ", " + std::to_string(w.bidx.y) + ", " + std::to_string(w.bidx.z) + ")";
  if (f != nullptr) {
    s += fmt(", thread (%u, %u, %u) [tid %d, warp %d, lane %d]", f->idx.x, f->idx.y, f->idx.z, f->tid, f->tid / kWarp,
             f->tid % kWarp);
  }
  return s + ": ";
}

[[noreturn]] void host_error(const std::string& msg) { TORCH_CHECK(false, "sslops CUDA emulator: ", msg); }

Fiber& cur_fiber(const char* what) {
  Fiber* f = tls_fiber;
  if (f == nullptr) host_error(std::string(what) + " called outside a kernel (no emulated thread is running)");
  return *f;
}

// Fails the running block: records the message and leaves the fiber for good
// (its stack is abandoned, never unwound).
[[noreturn]] void fail(const std::string& msg) {
  Fiber* f = tls_fiber;
  Worker* w = tls_worker;
  if (f == nullptr || w == nullptr) host_error(msg);
  if (!w->failed) {
    w->failed = true;
    w->error = where_prefix(*w, f) + msg;
  }
  f->st = St::kExited;
  switch_to(&f->sp, w->sched_sp);
  __builtin_unreachable();
}

void yield(Worker& w, Fiber& f) { switch_to(&f.sp, w.sched_sp); }

// ---------------------------------------------------------------------------
// Memory checks
// ---------------------------------------------------------------------------
std::string region_at(const Worker& w, size_t off) {
  const int16_t r = off < w.used ? w.owner[off] : int16_t(-1);
  if (r >= 0) {
    const Region& g = w.regions[r];
    return fmt("`%s`%s[byte %zu]", g.name.c_str(), r == 0 ? " (dynamic shared memory)" : "", off - g.off);
  }
  // a guard byte: name the closest region
  const Region* best = nullptr;
  std::string rel;
  size_t dist = SIZE_MAX;
  for (const Region& g : w.regions) {
    if (g.name.empty()) continue;
    if (off >= g.off + g.size && off - (g.off + g.size) < dist) {
      dist = off - (g.off + g.size);
      best = &g;
      rel = fmt("%zu bytes past the end of", dist);
    } else if (off < g.off && g.off - off < dist) {
      dist = g.off - off;
      best = &g;
      rel = fmt("%zu bytes before the start of", dist);
    }
  }
  if (best == nullptr) return fmt("shared memory offset %zu (no shared memory is declared)", off);
  return fmt("%s `%s` (%zu bytes%s)", rel.c_str(), best->name.c_str(), best->size,
             best == &w.regions[0] ? " of dynamic shared memory" : "");
}

bool warp_ordered(const Worker& w, int warp, uint32_t gen, unsigned need) {
  const auto& s = w.wsyncs[warp];
  for (size_t i = gen; i < s.size(); ++i)
    if ((s[i] & need) == need) return true;
  return false;
}

const char* const kRaceHelp =
    " in the same barrier interval with no __syncthreads (or, within a warp, __syncwarp / shuffle) between them";

void shared_access(Worker& w, size_t off, size_t n, bool write, int tid, bool atomic) {
  for (size_t i = off; i < off + n; ++i) {
    if (i >= w.used || w.owner[i] < 0) {
      fail(fmt("%s %zu bytes of shared memory out of bounds: byte %zu is ", write ? "writes" : "reads", n, i - off) +
           region_at(w, i));
    }
  }
  const uint32_t E = w.epoch;
  const int warp = tid / kWarp;
  const unsigned bit = 1u << (tid % kWarp);
  const uint32_t gen = static_cast<uint32_t>(w.wsyncs[warp].size());
  for (size_t i = off; i < off + n; ++i) {
    Cell& c = w.shadow[i];
    if (c.pend != 0) {
      fail(fmt("%s %s while a cp.async into it, issued by thread %d, has not been waited for (cp.async.wait_group / "
               "wait_all, then __syncthreads, before the data is used)",
               write ? "writes" : "reads", region_at(w, i).c_str(), c.pend - 1));
    }
    if (!write || atomic) {
      if (c.w_epoch == 0) {
        fail(fmt("reads %s, which no thread has written since the kernel started (uninitialised shared memory)",
                 region_at(w, i).c_str()));
      }
    }
    if (!atomic) {
      if (c.w_epoch == E && c.w_tid != tid &&
          !((c.w_tid / kWarp) == warp && warp_ordered(w, warp, c.w_gen, bit | (1u << (c.w_tid % kWarp))))) {
        fail(fmt("data race on %s: thread %d %s it and thread %d wrote it", region_at(w, i).c_str(), tid,
                 write ? "writes" : "reads", c.w_tid) +
             kRaceHelp);
      }
      if (write && c.r_epoch == E) {
        const unsigned others = c.r_warp == warp ? (c.r_mask & ~bit) : 0u;
        const bool racy = c.r_warp == kMultiWarp || c.r_warp != warp ||
                          (others != 0 && !warp_ordered(w, warp, c.r_gen, others | bit));
        if (racy) {
          const int reader = c.r_warp == kMultiWarp ? -1 : c.r_warp * kWarp + __builtin_ctz(others ? others : c.r_mask);
          fail(fmt("data race on %s: thread %d writes it after ", region_at(w, i).c_str(), tid) +
               (reader < 0 ? std::string("threads of several warps read it") : fmt("thread %d read it", reader)) +
               kRaceHelp);
        }
      }
    }
    if (write || atomic) {
      c.w_epoch = E;
      c.w_tid = static_cast<uint16_t>(tid);
      c.w_gen = gen;
    } else if (c.r_epoch != E) {
      c.r_epoch = E;
      c.r_warp = static_cast<uint16_t>(warp);
      c.r_mask = bit;
      c.r_gen = gen;
    } else if (c.r_warp == warp) {
      c.r_mask |= bit;
      c.r_gen = std::max(c.r_gen, gen);
    } else {
      c.r_warp = kMultiWarp;
    }
  }
}

bool in_ranges(const std::vector<Range>& rs, uintptr_t a, size_t n) {
  auto it = std::upper_bound(rs.begin(), rs.end(), a, [](uintptr_t v, const Range& r) { return v < r.lo; });
  if (it == rs.begin()) return false;
  --it;
  return a >= it->lo && a + n <= it->hi;
}

// Any access of an emulated thread that is not to its own stack.
void other_access(Worker& w, int tid, uintptr_t a, size_t n, bool write, bool atomic) {
  const uintptr_t arena = reinterpret_cast<uintptr_t>(w.arena);
  if (a - arena < kArenaCap) {
    shared_access(w, a - arena, n, write, tid, atomic);
    return;
  }
  const LaunchCtx& L = *w.L;
  if (a >= L.frame.lo && a < L.frame.hi) {
    if (write) fail(fmt("writes kernel parameter memory at %p", reinterpret_cast<void*>(a)));
    return;
  }
  if (!L.check_global) return;
  if (in_ranges(L.dev, a, n) || in_ranges(L.statics, a, n)) return;
  const Fiber& f = w.fibers[tid];
  if (a - f.stack_lo < f.stack_size) return;
  for (int t = 0; t < w.n; ++t) {
    const Fiber& g = w.fibers[t];
    if (a - g.stack_lo < g.stack_size) {
      fail(fmt("%s the local memory (stack) of thread %d at %p: local memory is private to its thread",
               write ? "writes" : "reads", t, reinterpret_cast<void*>(a)));
    }
  }
  fail(fmt("%s %zu bytes of global memory at %p, outside every tensor of this op (out of bounds?)",
           write ? "writes" : "reads", n, reinterpret_cast<void*>(a)));
}

inline void on_access(const void* p, size_t n, bool write) {
  Fiber* f = tls_fiber;
  if (f == nullptr) return;  // host code
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a - f->stack_lo < f->stack_size) return;  // own local memory
  other_access(*tls_worker, f->tid, a, n, write, false);
}

inline void on_atomic(const volatile void* p, size_t n) {
  Fiber* f = tls_fiber;
  if (f == nullptr) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a - f->stack_lo < f->stack_size) return;
  other_access(*tls_worker, f->tid, a, n, true, true);
}

// Checked access made by the runtime on behalf of lane `tid` (collectives, cp.async).
void lane_access(Worker& w, int tid, const void* p, size_t n, bool write) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const Fiber& f = w.fibers[tid];
  if (a - f.stack_lo < f.stack_size) return;
  other_access(w, tid, a, n, write, false);
}

bool is_shared(const Worker& w, const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(w.arena);
  return a < w.used && w.owner[a] >= 0;
}

// ---------------------------------------------------------------------------
// Device memory of the running op (OpScope) and the allocation hook
// ---------------------------------------------------------------------------
thread_local int tls_scope_depth = 0;
thread_local std::vector<Range> tls_dev;

void record_range(const void* p, size_t n) {
  if (p == nullptr || n == 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  tls_dev.push_back(Range{a, a + n});
}

struct TrackingAllocator final : c10::Allocator {
  c10::Allocator* base = nullptr;
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr d = base->allocate(n);
    if (tls_scope_depth > 0) record_range(d.get(), n);
    return d;
  }
  c10::DeleterFnPtr raw_deleter() const override { return base->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    base->copy_data(dest, src, count);
  }
};

void install_allocator() {
  static TrackingAllocator alloc;
  static std::once_flag once;
  std::call_once(once, [] {
    alloc.base = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&alloc, /*priority=*/100);
  });
}

std::vector<Range> merged(std::vector<Range> rs) {
  std::sort(rs.begin(), rs.end(), [](const Range& a, const Range& b) { return a.lo < b.lo; });
  std::vector<Range> out;
  for (const Range& r : rs) {
    if (!out.empty() && r.lo <= out.back().hi) {
      out.back().hi = std::max(out.back().hi, r.hi);
    } else {
      out.push_back(r);
    }
  }
  return out;
}

std::vector<Range> module_segments(const void* addr) {
  static std::mutex mu;
  static std::unordered_map<uintptr_t, std::vector<Range>> cache;
  Dl_info info;
  if (dladdr(addr, &info) == 0) return {};
  const uintptr_t base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(base);
  if (it != cache.end()) return it->second;
  struct Arg {
    uintptr_t want;
    std::vector<Range> out;
  } arg{reinterpret_cast<uintptr_t>(addr), {}};
  dl_iterate_phdr(
      [](dl_phdr_info* i, size_t, void* data) -> int {
        auto* a = static_cast<Arg*>(data);
        std::vector<Range> segs;
        bool mine = false;
        for (int k = 0; k < i->dlpi_phnum; ++k) {
          const ElfW(Phdr)& ph = i->dlpi_phdr[k];
          if (ph.p_type != PT_LOAD) continue;
          const uintptr_t lo = i->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
          segs.push_back(Range{lo, hi});
          if (a->want >= lo && a->want < hi) mine = true;
        }
        if (mine) {
          a->out = segs;
          return 1;
        }
        return 0;
      },
      &arg);
  auto segs = merged(arg.out);
  cache[base] = segs;
  return segs;
}

// ---------------------------------------------------------------------------
// The emulated device
// ---------------------------------------------------------------------------
cudaDeviceProp make_props(bool h100) {
  cudaDeviceProp p;
  std::memset(&p, 0, sizeof p);
  std::snprintf(p.name, sizeof p.name, "%s", h100 ? "NVIDIA H100 (sslops emulator)" : "NVIDIA A100 (sslops emulator)");
  p.totalGlobalMem = size_t(80) << 30;
  p.sharedMemPerBlock = 48 * 1024;
  p.regsPerBlock = 65536;
  p.warpSize = 32;
  p.maxThreadsPerBlock = 1024;
  p.maxThreadsDim[0] = 1024;
  p.maxThreadsDim[1] = 1024;
  p.maxThreadsDim[2] = 64;
  p.maxGridSize[0] = 2147483647;
  p.maxGridSize[1] = 65535;
  p.maxGridSize[2] = 65535;
  p.clockRate = h100 ? 1980000 : 1410000;
  p.major = h100 ? 9 : 8;
  p.minor = 0;
  p.multiProcessorCount = h100 ? 132 : 108;
  p.l2CacheSize = h100 ? 50 << 20 : 40 << 20;
  p.maxThreadsPerMultiProcessor = 2048;
  p.sharedMemPerMultiprocessor = (h100 ? 228 : 164) * 1024;
  p.regsPerMultiprocessor = 65536;
  p.sharedMemPerBlockOptin = (h100 ? 227 : 163) * 1024;
  p.reservedSharedMemPerBlock = 1024;
  p.maxBlocksPerMultiProcessor = 32;
  return p;
}

std::atomic<int> g_device{-1};  // 0: H100, 1: A100

int device_choice() {
  int d = g_device.load();
  if (d < 0) {
    const char* v = std::getenv("SSLOPS_EMU_DEVICE");
    const std::string s = v ? v : "h100";
    TORCH_CHECK(s == "h100" || s == "a100", "SSLOPS_EMU_DEVICE must be h100 or a100, got ", s);
    d = s == "h100" ? 0 : 1;
    g_device.store(d);
  }
  return d;
}

std::atomic<int> g_last_error{cudaSuccess};
std::mutex g_attr_mu;
std::unordered_map<const void*, int> g_max_dyn;  // kernel -> cudaFuncAttributeMaxDynamicSharedMemorySize

size_t smem_limit_of(const void* fn) {
  std::lock_guard<std::mutex> lock(g_attr_mu);
  auto it = g_max_dyn.find(fn);
  return it == g_max_dyn.end() ? kDefaultSmemLimit : static_cast<size_t>(it->second);
}

std::atomic<int64_t> g_launches{0}, g_blocks{0}, g_threads{0}, g_collectives{0};
std::atomic<int> g_host_threads{0};  // 0: at::get_num_threads()

// ---------------------------------------------------------------------------
// Blocks
// ---------------------------------------------------------------------------
void reset_shared(Worker& w, size_t dyn) {
  // previous extent back to guard
  std::fill(w.owner.begin(), w.owner.begin() + w.used, int16_t(-1));
  w.regions.clear();
  w.regions.push_back(Region{"", kGuard, dyn, nullptr});
  w.static_cursor = (kGuard + dyn + kGuard + 255) & ~size_t(255);
  w.static_bytes = 0;
  w.used = w.static_cursor;
  std::fill(w.owner.begin() + kGuard, w.owner.begin() + kGuard + dyn, int16_t(0));
  std::memset(w.arena, 0xff, w.used);  // poison: NaN for floating types, -1 for integers
  std::memset(static_cast<void*>(w.shadow.data()), 0, w.used * sizeof(Cell));
}

[[noreturn]] void thread_exit(Worker& w, Fiber& f);

void fiber_main(void* arg) {
  Fiber* f = static_cast<Fiber*>(arg);
  Worker& w = *tls_worker;
  std::string err;
  try {
    w.L->d.invoke(w.L->d.frame);
  } catch (const c10::Error& e) {
    err = std::string("device code threw: ") + e.what_without_backtrace();
  } catch (const std::exception& e) {
    err = std::string("device code threw: ") + e.what();
  } catch (...) {
    err = "device code threw an unknown exception";
  }
  if (!err.empty()) fail(err);  // outside the catch block: the fiber is abandoned
  thread_exit(w, *f);
}

std::string describe_waits(const Worker& w) {
  std::string s;
  int t = 0;
  int shown = 0;
  while (t < w.n && shown < 12) {
    const Fiber& f = w.fibers[t];
    int e = t + 1;
    auto same = [&](const Fiber& g) {
      return g.st == f.st && g.line == f.line && g.file == f.file && g.wmask == f.wmask && g.wkind == f.wkind;
    };
    while (e < w.n && same(w.fibers[e])) ++e;
    std::string what;
    switch (f.st) {
      case St::kExited:
        what = "exited";
        break;
      case St::kReady:
        what = "running";
        break;
      case St::kBarrier:
        what = "wait at __syncthreads " + site(f.file, f.line);
        break;
      case St::kWarp:
        what = fmt("wait in %s (mask 0x%08x) at %s", kWarpKindName[f.wkind], f.wmask, site(f.file, f.line).c_str());
        break;
    }
    s += (e - t == 1 ? fmt("thread %d ", t) : fmt("threads %d-%d ", t, e - 1)) + what + "; ";
    ++shown;
    t = e;
  }
  return s;
}

void run_block(Worker& w, const LaunchCtx& L, int64_t b) {
  const dim3 g = L.d.grid, bd = L.d.block;
  w.L = &L;
  w.bidx = uint3{static_cast<unsigned>(b % g.x), static_cast<unsigned>((b / g.x) % g.y),
                 static_cast<unsigned>(b / (int64_t(g.x) * g.y))};
  w.n = L.nthreads;
  w.epoch = 1;
  w.wsyncs.assign((w.n + kWarp - 1) / kWarp, {});
  w.at_barrier = w.exited = 0;
  w.failed = false;
  w.error.clear();
  reset_shared(w, L.dyn);
  ensure_fibers(w, w.n);
  for (int t = 0; t < w.n; ++t) {
    Fiber& f = w.fibers[t];
    const Stack& s = w.stacks[t];
    f.stack_lo = reinterpret_cast<uintptr_t>(s.lo);
    f.stack_size = s.size;
    f.tid = t;
    f.idx = uint3{t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y)};
    f.st = St::kReady;
    f.file = "";
    f.line = 0;
    f.wkind = 0;
    f.wmask = 0;
    f.copies.clear();
    f.groups = 0;
    f.sp = init_stack(s.lo + s.size, &fiber_main, &f);
  }
  for (;;) {
    bool ran = false;
    for (int t = 0; t < w.n; ++t) {
      Fiber& f = w.fibers[t];
      if (f.st != St::kReady) continue;
      ran = true;
      tls_fiber = &f;
      switch_to(&w.sched_sp, f.sp);
      tls_fiber = nullptr;
      if (w.failed) return;
    }
    if (w.exited == w.n) break;
    if (!ran) {
      w.failed = true;
      w.error = where_prefix(w, nullptr) + "deadlock: no thread can make progress (" + describe_waits(w) + ")";
      return;
    }
  }
  g_threads += w.n;
}

// ---------------------------------------------------------------------------
// Barriers and thread exit
// ---------------------------------------------------------------------------
const Fiber* first_exited(const Worker& w) {
  for (int t = 0; t < w.n; ++t)
    if (w.fibers[t].st == St::kExited) return &w.fibers[t];
  return nullptr;
}

[[noreturn]] void thread_exit(Worker& w, Fiber& f) {
  if (!f.copies.empty()) {
    fail(fmt("exits with %zu cp.async copies it never waited for (missing cp.async.wait_group / wait_all)",
             f.copies.size()));
  }
  if (w.at_barrier > 0) {
    fail(fmt("exits while %d threads wait at __syncthreads %s: every thread of the block must reach every "
             "__syncthreads (divergent barrier)",
             w.at_barrier, site(w.bar_file, w.bar_line).c_str()));
  }
  const int base = f.tid & ~(kWarp - 1), lane = f.tid % kWarp;
  for (int t = base; t < std::min(base + kWarp, w.n); ++t) {
    const Fiber& g = w.fibers[t];
    if (g.st == St::kWarp && ((g.wmask >> lane) & 1u)) {
      fail(fmt("exits while lane %d waits for it in %s (mask 0x%08x) at %s", t % kWarp, kWarpKindName[g.wkind],
               g.wmask, site(g.file, g.line).c_str()));
    }
  }
  f.st = St::kExited;
  ++w.exited;
  switch_to(&f.sp, w.sched_sp);
  __builtin_unreachable();
}

// ---------------------------------------------------------------------------
// Warp operations
// ---------------------------------------------------------------------------
bool payload_agrees(int kind, const void* a, const void* b) {
  switch (kind) {
    case kWShfl: {
      auto* x = static_cast<const ShflPayload*>(a);
      auto* y = static_cast<const ShflPayload*>(b);
      return x->mode == y->mode && x->width == y->width;
    }
    case kWVote:
      return static_cast<const VotePayload*>(a)->kind == static_cast<const VotePayload*>(b)->kind;
    case kWWmmaLoad:
    case kWWmmaStore: {
      auto* x = static_cast<const WmmaMemPayload*>(a);
      auto* y = static_cast<const WmmaMemPayload*>(b);
      return x->ptr == y->ptr && x->ldm == y->ldm && x->col == y->col && x->f.use == y->f.use &&
             x->f.type == y->f.type;
    }
    case kWLdmatrix: {
      auto* x = static_cast<const LdmatrixPayload*>(a);
      auto* y = static_cast<const LdmatrixPayload*>(b);
      return x->count == y->count && x->trans == y->trans;
    }
    case kWMma:
      return static_cast<const MmaPayload*>(a)->type == static_cast<const MmaPayload*>(b)->type;
    default:
      return true;
  }
}

const char* op_name(int kind, const void* payload) {
  if (kind == kWShfl) return kShflName[static_cast<const ShflPayload*>(payload)->mode];
  return kWarpKindName[kind];
}

void complete(Worker& w, int kind, int base, unsigned mask);

// A lane arrives at a warp operation; returns once every lane of mask has arrived
// and the operation is done.
void warp_op(int kind, unsigned mask, const char* file, int line, void* payload) {
  Fiber& f = cur_fiber(kWarpKindName[kind]);
  Worker& w = *tls_worker;
  const int lane = f.tid % kWarp, base = f.tid - lane;
  const char* const name = op_name(kind, payload);
  if (!((mask >> lane) & 1u)) {
    fail(fmt("calls %s at %s with mask 0x%08x, which does not include its own lane %d", name,
             site(file, line).c_str(), mask, lane));
  }
  for (int l = 0; l < kWarp; ++l) {
    const int t = base + l;
    const bool named = (mask >> l) & 1u;
    if (named && t >= w.n) {
      fail(fmt("calls %s at %s with mask 0x%08x, which names lane %d, but the block has %d threads (warp %d has "
               "only %d lanes)",
               name, site(file, line).c_str(), mask, l, w.n, base / kWarp, w.n - base));
    }
    if (t >= w.n || t == f.tid) continue;
    const Fiber& g = w.fibers[t];
    if (named && g.st == St::kExited) {
      fail(fmt("calls %s at %s with mask 0x%08x, which names lane %d (thread %d), which has exited", name,
               site(file, line).c_str(), mask, l, t));
    }
    if (named && g.st == St::kBarrier) {
      fail(fmt("calls %s at %s with mask 0x%08x, but lane %d of the mask waits at __syncthreads %s and cannot "
               "arrive",
               name, site(file, line).c_str(), mask, l, site(g.file, g.line).c_str()));
    }
    if (g.st == St::kWarp && (named || ((g.wmask >> lane) & 1u)) &&
        (g.wkind != kind || g.wmask != mask || !payload_agrees(kind, g.payload, payload))) {
      fail(fmt("lanes disagree: lane %d calls %s with mask 0x%08x at %s while lane %d waits in %s with mask 0x%08x "
               "at %s",
               lane, name, mask, site(file, line).c_str(), l, op_name(g.wkind, g.payload), g.wmask,
               site(g.file, g.line).c_str()));
    }
  }
  f.st = St::kWarp;
  f.file = file;
  f.line = line;
  f.wkind = kind;
  f.wmask = mask;
  f.payload = payload;
  bool all = true;
  for (int l = 0; l < kWarp && all; ++l)
    if (((mask >> l) & 1u) && w.fibers[base + l].st != St::kWarp) all = false;
  if (!all) {
    yield(w, f);
    return;
  }
  complete(w, kind, base, mask);
  for (int l = 0; l < kWarp; ++l)
    if ((mask >> l) & 1u) w.fibers[base + l].st = St::kReady;
  if (kind == kWSyncwarp || kind == kWShfl || kind == kWVote) w.wsyncs[base / kWarp].push_back(mask);
  ++g_collectives;
}

template <class P>
P& payload_of(Worker& w, int t) {
  return *static_cast<P*>(w.fibers[t].payload);
}

// ---- WMMA fragment layout (emulator-specific; CUDA leaves it unspecified) ----
inline void frag_pos(int lane, int e, int& r, int& c) {
  const int q = lane * 8 + (e & 7);
  const int rc = (q * 167 + 91) & 255;
  r = rc >> 4;
  c = rc & 15;
}

size_t elem_bytes(ElemType t) { return t == ElemType::kF32 ? 4 : 2; }

float to_float(ElemType t, const void* p) {
  if (t == ElemType::kF32) {
    float v;
    std::memcpy(&v, p, 4);
    return v;
  }
  uint16_t b;
  std::memcpy(&b, p, 2);
  return t == ElemType::kF16 ? c10::detail::fp16_ieee_to_fp32_value(b) : c10::detail::f32_from_bits(b);
}

void wmma_mem(Worker& w, int base, bool store) {
  const auto& p0 = payload_of<WmmaMemPayload>(w, base);
  const size_t eb = elem_bytes(p0.f.type);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p0.ptr);
  if (addr % 32 != 0) {
    fail(fmt("wmma::%s_matrix_sync: the pointer %p is not 256-bit (32-byte) aligned", store ? "store" : "load",
             p0.ptr));
  }
  if ((p0.ldm * eb) % 16 != 0) {
    fail(fmt("wmma::%s_matrix_sync: ldm = %u is not a multiple of 16 bytes (%zu elements)", store ? "store" : "load",
             p0.ldm, 16 / eb));
  }
  for (int l = 0; l < kWarp; ++l) {
    const auto& p = payload_of<WmmaMemPayload>(w, base + l);
    char* x = static_cast<char*>(p.f.x);
    for (int e = 0; e < p.f.num_elements; ++e) {
      int r, c;
      frag_pos(l, e, r, c);
      const size_t off = p.col ? size_t(c) * p.ldm + r : size_t(r) * p.ldm + c;
      char* m = static_cast<char*>(const_cast<void*>(p.ptr)) + off * eb;
      lane_access(w, base + l, m, eb, store);
      if (store) {
        std::memcpy(m, x + e * eb, eb);
      } else {
        std::memcpy(x + e * eb, m, eb);
      }
    }
  }
}

void wmma_mma_all(Worker& w, int base) {
  float A[16][16], B[16][16], C[16][16];
  for (int l = 0; l < kWarp; ++l) {
    const auto& p = payload_of<WmmaMmaPayload>(w, base + l);
    for (int e = 0; e < 8; ++e) {
      int r, c;
      frag_pos(l, e, r, c);
      A[r][c] = to_float(p.a.type, static_cast<const char*>(p.a.x) + e * elem_bytes(p.a.type));
      B[r][c] = to_float(p.b.type, static_cast<const char*>(p.b.x) + e * elem_bytes(p.b.type));
      C[r][c] = static_cast<const float*>(p.c.x)[e];
    }
  }
  float D[16][16];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc = C[m][n];
      for (int k = 0; k < 16; ++k) {
        const float prod = A[m][k] * B[k][n];  // exact: half/bfloat16 products fit in float
        acc = acc + prod;                       // float32 sum, in k order
      }
      D[m][n] = acc;
    }
  for (int l = 0; l < kWarp; ++l) {
    const auto& p = payload_of<WmmaMmaPayload>(w, base + l);
    for (int e = 0; e < 8; ++e) {
      int r, c;
      frag_pos(l, e, r, c);
      static_cast<float*>(p.d.x)[e] = D[r][c];
    }
  }
}

void ldmatrix_all(Worker& w, int base) {
  const auto& p0 = payload_of<LdmatrixPayload>(w, base);
  uint16_t M[4][8][8];
  for (int j = 0; j < p0.count; ++j)
    for (int i = 0; i < 8; ++i) {
      const int src = base + 8 * j + i;
      const void* ptr = payload_of<LdmatrixPayload>(w, src).ptr;
      if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {
        fail(fmt("ldmatrix: lane %d's row address %p (row %d of matrix %d) is not 16-byte aligned", 8 * j + i, ptr, i,
                 j));
      }
      if (!is_shared(w, ptr)) {
        lane_access(w, src, ptr, 16, false);  // names an out-of-bounds shared access precisely
        fail(fmt("ldmatrix: lane %d's row address %p is not shared memory", 8 * j + i, ptr));
      }
      lane_access(w, src, ptr, 16, false);
      std::memcpy(M[j][i], ptr, 16);
    }
  for (int l = 0; l < kWarp; ++l) {
    auto& p = payload_of<LdmatrixPayload>(w, base + l);
    const int g = l / 4, t = l % 4;
    for (int j = 0; j < p.count; ++j) {
      const uint16_t lo = p.trans ? M[j][2 * t][g] : M[j][g][2 * t];
      const uint16_t hi = p.trans ? M[j][2 * t + 1][g] : M[j][g][2 * t + 1];
      p.regs[j] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}

void mma_all(Worker& w, int base) {
  const MmaType type = payload_of<MmaPayload>(w, base).type;
  auto h2f = [type](uint16_t b) {
    return type == MmaType::kF16 ? c10::detail::fp16_ieee_to_fp32_value(b) : c10::detail::f32_from_bits(b);
  };
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < kWarp; ++l) {
    const auto& p = payload_of<MmaPayload>(w, base + l);
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 8; ++i) {  // a0..a7: a[i / 2], half i % 2
      const uint16_t bits = static_cast<uint16_t>(p.a[i / 2] >> (16 * (i & 1)));
      const int row = g + 8 * ((i >> 1) & 1);
      const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = h2f(bits);
    }
    for (int i = 0; i < 4; ++i) {  // b0..b3: b[i / 2], half i % 2
      const uint16_t bits = static_cast<uint16_t>(p.b[i / 2] >> (16 * (i & 1)));
      const int k = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      B[k][g] = h2f(bits);
    }
    for (int i = 0; i < 4; ++i) C[g + (i >= 2 ? 8 : 0)][t * 2 + (i & 1)] = p.c[i];
  }
  float D[16][8];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      float acc = C[m][n];
      for (int k = 0; k < 16; ++k) {
        const float prod = A[m][k] * B[k][n];
        acc = acc + prod;
      }
      D[m][n] = acc;
    }
  for (int l = 0; l < kWarp; ++l) {
    const auto& p = payload_of<MmaPayload>(w, base + l);
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) p.d[i] = D[g + (i >= 2 ? 8 : 0)][t * 2 + (i & 1)];
  }
}

void complete(Worker& w, int kind, int base, unsigned mask) {
  switch (kind) {
    case kWSyncwarp:
      return;
    case kWShfl:
      for (int l = 0; l < kWarp; ++l) {
        if (!((mask >> l) & 1u)) continue;
        auto& p = payload_of<ShflPayload>(w, base + l);
        const int width = p.width, seg = l & ~(width - 1);
        int src = l;
        switch (p.mode) {
          case kShflIdx:
            src = seg + (p.arg & (width - 1));
            break;
          case kShflUp:
            src = (l - seg) >= p.arg ? l - p.arg : l;
            break;
          case kShflDown:
            src = (l - seg) + p.arg < width ? l + p.arg : l;
            break;
          default:
            src = l ^ p.arg;
            if (src >= seg + width || src >= kWarp || src < 0) src = l;
            break;
        }
        if (!((mask >> src) & 1u)) {
          tls_fiber = &w.fibers[base + l];  // report it as that lane's error
          fail(fmt("%s: lane %d reads lane %d, which is not in the mask 0x%08x (the result is undefined)",
                   kShflName[p.mode], l, src, mask));
        }
        p.out = payload_of<ShflPayload>(w, base + src).in;
      }
      return;
    case kWVote: {
      const auto& p0 = payload_of<VotePayload>(w, base);
      uint64_t ballot = 0;
      int64_t sacc = 0;
      uint64_t uacc = 0;
      bool first = true;
      for (int l = 0; l < kWarp; ++l) {
        if (!((mask >> l) & 1u)) continue;
        const auto& p = payload_of<VotePayload>(w, base + l);
        if (p.in != 0) ballot |= 1ull << l;
        const int64_t sv = static_cast<int32_t>(p.in);
        const uint64_t uv = static_cast<uint32_t>(p.in);
        if (first) {
          sacc = sv;
          uacc = uv;
          first = false;
          continue;
        }
        switch (p0.kind) {
          case kReduceAdd:
            uacc = static_cast<uint32_t>(uacc + uv);
            break;
          case kReduceMin:
            sacc = std::min(sacc, sv), uacc = std::min(uacc, uv);
            break;
          case kReduceMax:
            sacc = std::max(sacc, sv), uacc = std::max(uacc, uv);
            break;
          case kReduceAnd:
            uacc &= uv;
            break;
          case kReduceOr:
            uacc |= uv;
            break;
          case kReduceXor:
            uacc ^= uv;
            break;
          default:
            break;
        }
      }
      uint64_t out = 0;
      switch (p0.kind) {
        case kBallot:
          out = ballot;
          break;
        case kAny:
          out = ballot != 0;
          break;
        case kAll:
          out = ballot == mask;
          break;
        case kUni:
          out = ballot == 0 || ballot == mask;
          break;
        case kReduceMin:
        case kReduceMax:
          out = p0.is_signed ? static_cast<uint64_t>(sacc) : uacc;
          break;
        default:
          out = uacc;
          break;
      }
      for (int l = 0; l < kWarp; ++l)
        if ((mask >> l) & 1u) payload_of<VotePayload>(w, base + l).out = out;
      return;
    }
    case kWWmmaLoad:
      return wmma_mem(w, base, false);
    case kWWmmaStore:
      return wmma_mem(w, base, true);
    case kWWmmaMma:
      return wmma_mma_all(w, base);
    case kWLdmatrix:
      return ldmatrix_all(w, base);
    case kWMma:
      return mma_all(w, base);
  }
}

// ---------------------------------------------------------------------------
// cp.async
// ---------------------------------------------------------------------------
void land(Worker& w, Fiber& f, const Copy& c) {
  const size_t off = static_cast<size_t>(c.dst - w.arena);
  for (int i = 0; i < c.bytes; ++i) w.shadow[off + i].pend = 0;
  shared_access(w, off, c.bytes, true, f.tid, false);  // the write happens now (race check)
  if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
  if (c.src_bytes < c.bytes) std::memset(c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
}

}  // namespace

// ===========================================================================
// Public runtime API (emu.h)
// ===========================================================================
uint3 thread_idx() { return cur_fiber("threadIdx").idx; }
uint3 block_idx() {
  cur_fiber("blockIdx");
  return tls_worker->bidx;
}
dim3 block_dim() {
  cur_fiber("blockDim");
  return tls_worker->L->d.block;
}
dim3 grid_dim() {
  cur_fiber("gridDim");
  return tls_worker->L->d.grid;
}

int syncthreads(const char* file, int line, int kind, int pred) {
  Fiber& f = cur_fiber("__syncthreads");
  Worker& w = *tls_worker;
  if (w.exited > 0) {
    const Fiber* e = first_exited(w);
    fail(fmt("reaches __syncthreads at %s after thread %d has exited: every thread of the block must reach every "
             "__syncthreads (divergent barrier)",
             site(file, line).c_str(), e->tid));
  }
  const int base = f.tid & ~(kWarp - 1);
  for (int t = base; t < std::min(base + kWarp, w.n); ++t) {
    const Fiber& g = w.fibers[t];
    if (g.st == St::kWarp && ((g.wmask >> (f.tid % kWarp)) & 1u)) {
      fail(fmt("reaches __syncthreads at %s while lane %d waits for it in %s (mask 0x%08x) at %s",
               site(file, line).c_str(), t % kWarp, kWarpKindName[g.wkind], g.wmask, site(g.file, g.line).c_str()));
    }
  }
  if (w.at_barrier == 0) {
    w.bar_file = file;
    w.bar_line = line;
    w.bar_kind = kind;
    w.bar_acc = kind == 2 ? 1 : 0;
  } else if (w.bar_line != line || std::strcmp(w.bar_file, file) != 0 || w.bar_kind != kind) {
    fail(fmt("divergent __syncthreads: reaches the barrier at %s while %d threads wait at the barrier at %s",
             site(file, line).c_str(), w.at_barrier, site(w.bar_file, w.bar_line).c_str()));
  }
  if (kind == 1) w.bar_acc += pred;
  if (kind == 2) w.bar_acc &= pred;
  if (kind == 3) w.bar_acc |= pred;
  f.st = St::kBarrier;
  f.file = file;
  f.line = line;
  if (++w.at_barrier < w.n) {
    yield(w, f);
    return f.bar_result;
  }
  for (int t = 0; t < w.n; ++t) {
    w.fibers[t].st = St::kReady;
    w.fibers[t].bar_result = w.bar_acc;
  }
  w.at_barrier = 0;
  ++w.epoch;
  for (auto& s : w.wsyncs) s.clear();
  return w.bar_acc;
}

void syncwarp(const char* file, int line, unsigned mask) { warp_op(kWSyncwarp, mask, file, line, nullptr); }

uint64_t shfl(const char* file, int line, int mode, unsigned mask, uint64_t bits, int arg, int width) {
  if (width < 1 || width > kWarp || (width & (width - 1)) != 0) {
    cur_fiber("shuffle");
    fail(fmt("%s at %s: width = %d must be a power of two in [1, 32]", kShflName[mode & 3], site(file, line).c_str(),
             width));
  }
  ShflPayload p{mode, arg, width, bits, 0};
  warp_op(kWShfl, mask, file, line, &p);
  return p.out;
}

uint64_t vote(const char* file, int line, int kind, unsigned mask, uint64_t value, bool is_signed) {
  VotePayload p{kind, is_signed, value, 0};
  warp_op(kWVote, mask, file, line, &p);
  return p.out;
}

unsigned active_mask() {
  Fiber& f = cur_fiber("__activemask");
  Worker& w = *tls_worker;
  const int base = f.tid & ~(kWarp - 1);
  unsigned m = 0;
  for (int t = base; t < std::min(base + kWarp, w.n); ++t)
    if (w.fibers[t].st != St::kExited) m |= 1u << (t - base);
  return m;
}

void trap(const char* what, const char* file, int line) {
  cur_fiber(what);
  fail(fmt("%s at %s", what, site(file, line).c_str()));
}

void device_assert(const char* cond, const char* file, int line, const char* func) {
  cur_fiber("CUDA_KERNEL_ASSERT");
  fail(fmt("device-side assert triggered at %s in %s: %s", site(file, line).c_str(), func, cond));
}

void* static_shared(const void* tag, size_t size, size_t align, const char* name) {
  cur_fiber("SSLOPS_SHARED");
  Worker& w = *tls_worker;
  for (size_t r = 1; r < w.regions.size(); ++r)
    if (w.regions[r].tag == tag) return w.arena + w.regions[r].off;
  align = std::max<size_t>(align, 16);
  const size_t off = (w.static_cursor + align - 1) / align * align;
  if (w.static_bytes + size > kDefaultSmemLimit || off + size + kGuard > kArenaCap) {
    fail(fmt("static shared memory exceeds 48 KB (`%s` needs %zu bytes more than the %zu already declared)", name, size,
             w.static_bytes));
  }
  if (w.static_bytes + size + w.L->dyn > w.L->smem_limit) {
    fail(fmt("static (%zu B) + dynamic (%zu B) shared memory exceeds the kernel's limit of %zu B", w.static_bytes + size,
             w.L->dyn, w.L->smem_limit));
  }
  const int16_t idx = static_cast<int16_t>(w.regions.size());
  w.regions.push_back(Region{name, off, size, tag});
  const size_t end = off + size + kInnerGuard;
  if (end > w.used) {
    std::memset(w.arena + w.used, 0xff, end - w.used);
    std::memset(static_cast<void*>(w.shadow.data() + w.used), 0, (end - w.used) * sizeof(Cell));
    w.used = end;
  }
  std::fill(w.owner.begin() + off, w.owner.begin() + off + size, idx);
  w.static_cursor = end;
  w.static_bytes += size;
  return w.arena + off;
}

void* dynamic_shared(size_t align, const char* name) {
  cur_fiber("SSLOPS_DYNAMIC_SHARED");
  Worker& w = *tls_worker;
  if (w.regions[0].name.empty()) w.regions[0].name = name;
  (void)align;  // the dynamic region starts on a page boundary
  return w.arena + kGuard;
}

void cp_async(void* smem, const void* gmem, int bytes, int src_bytes, bool cg) {
  Fiber& f = cur_fiber("cp.async");
  Worker& w = *tls_worker;
  if (cg && bytes != 16) fail("cp.async.cg copies exactly 16 bytes");
  if (src_bytes < 0 || src_bytes > bytes) fail(fmt("cp.async: src-size %d outside [0, %d]", src_bytes, bytes));
  const uintptr_t d = reinterpret_cast<uintptr_t>(smem), s = reinterpret_cast<uintptr_t>(gmem);
  if (d % bytes != 0 || (src_bytes > 0 && s % bytes != 0)) {
    fail(fmt("cp.async of %d bytes: misaligned address (shared %p, global %p)", bytes, smem, gmem));
  }
  const uintptr_t off = d - reinterpret_cast<uintptr_t>(w.arena);
  if (off >= kArenaCap) fail(fmt("cp.async: the destination %p is not shared memory", smem));
  for (int i = 0; i < bytes; ++i) {
    if (off + i >= w.used || w.owner[off + i] < 0) {
      fail(fmt("cp.async writes shared memory out of bounds: byte %d is ", i) + region_at(w, off + i));
    }
    Cell& c = w.shadow[off + i];
    if (c.pend != 0) {
      fail(fmt("cp.async into %s while an earlier cp.async into it (thread %d) has not been waited for",
               region_at(w, off + i).c_str(), c.pend - 1));
    }
  }
  if (src_bytes > 0) {
    if (reinterpret_cast<uintptr_t>(gmem) - reinterpret_cast<uintptr_t>(w.arena) < kArenaCap) {
      fail("cp.async: the source must be global memory, not shared memory");
    }
    lane_access(w, f.tid, gmem, src_bytes, false);
  }
  for (int i = 0; i < bytes; ++i) w.shadow[off + i].pend = static_cast<uint16_t>(f.tid + 1);
  f.copies.push_back(Copy{static_cast<char*>(smem), static_cast<const char*>(gmem), bytes, src_bytes, f.groups});
}

void cp_async_commit() { ++cur_fiber("cp.async.commit_group").groups; }

void cp_async_wait(int n) {
  Fiber& f = cur_fiber("cp.async.wait");
  Worker& w = *tls_worker;
  if (n < 0) ++f.groups;  // wait_all = commit_group; wait_group 0
  const int limit = f.groups - std::max(n, 0);  // groups [0, limit) must be complete
  std::vector<Copy> keep;
  for (const Copy& c : f.copies) {
    if (c.group < limit) {
      land(w, f, c);
    } else {
      keep.push_back(c);
    }
  }
  f.copies.swap(keep);
}

void ldmatrix(int count, bool trans, uint32_t* regs, const void* smem) {
  LdmatrixPayload p{count, trans, regs, smem};
  warp_op(kWLdmatrix, 0xffffffffu, "ldmatrix", 0, &p);
}

void mma_m16n8k16(MmaType type, float* d, const uint32_t* a, const uint32_t* b, const float* c) {
  MmaPayload p{type, d, a, b, c};
  warp_op(kWMma, 0xffffffffu, "mma.sync", 0, &p);
}

void wmma_load(const FragDesc& f, const void* ptr, unsigned ldm, bool col_major) {
  WmmaMemPayload p{f, ptr, ldm, col_major};
  warp_op(kWWmmaLoad, 0xffffffffu, "wmma::load_matrix_sync", 0, &p);
}

void wmma_store(void* ptr, const FragDesc& f, unsigned ldm, bool col_major) {
  WmmaMemPayload p{f, ptr, ldm, col_major};
  warp_op(kWWmmaStore, 0xffffffffu, "wmma::store_matrix_sync", 0, &p);
}

void wmma_mma(const FragDesc& d, const FragDesc& a, const FragDesc& b, const FragDesc& c) {
  WmmaMmaPayload p{d, a, b, c};
  warp_op(kWWmmaMma, 0xffffffffu, "wmma::mma_sync", 0, &p);
}

// ---------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------
void launch_impl(const LaunchDesc& d) {
  const cudaDeviceProp& prop = device_properties();
  const int64_t threads = int64_t(d.block.x) * d.block.y * d.block.z;
  auto bad = [](cudaError_t e) { g_last_error.store(e); };
  if (d.block.x == 0 || d.block.y == 0 || d.block.z == 0 || d.block.x > 1024 || d.block.y > 1024 ||
      d.block.z > 64 || threads > prop.maxThreadsPerBlock || d.grid.x == 0 || d.grid.y == 0 || d.grid.z == 0 ||
      d.grid.x > 2147483647u || d.grid.y > 65535 || d.grid.z > 65535) {
    return bad(cudaErrorInvalidConfiguration);
  }
  const size_t limit = smem_limit_of(d.fn);
  if (d.smem > limit) return bad(cudaErrorInvalidValue);
  if (d.stream != nullptr) return bad(cudaErrorInvalidValue);

  LaunchCtx L;
  L.d = d;
  L.name = d.kernel;
  if (L.name.size() >= 2 && L.name.front() == '(' && L.name.back() == ')') L.name = L.name.substr(1, L.name.size() - 2);
  L.nthreads = static_cast<int>(threads);
  L.dyn = d.smem;
  L.smem_limit = limit;
  L.check_global = tls_scope_depth > 0;
  if (L.check_global) {
    L.dev = merged(tls_dev);
    L.statics = module_segments(reinterpret_cast<const void*>(d.invoke));
  }
  L.frame = Range{reinterpret_cast<uintptr_t>(d.frame), reinterpret_cast<uintptr_t>(d.frame) + d.frame_size};
  ++g_launches;

  const int64_t nblocks = int64_t(d.grid.x) * d.grid.y * d.grid.z;
  g_blocks += nblocks;
  int nt = g_host_threads.load();
  if (nt <= 0) nt = at::get_num_threads();
  std::vector<std::string> errors;
  std::mutex mu;
  std::atomic<int64_t> first_error{INT64_MAX};
  auto run_range = [&](int64_t b0, int64_t b1) {
    Worker& w = worker();
    for (int64_t b = b0; b < b1; ++b) {
      if (b > first_error.load()) return;
      run_block(w, L, b);
      if (w.failed) {
        std::lock_guard<std::mutex> lock(mu);
        if (b < first_error.load()) {
          first_error.store(b);
          errors.assign(1, w.error);
        }
        return;
      }
    }
  };
  if (nt <= 1 || nblocks == 1) {
    run_range(0, nblocks);
  } else {
    at::parallel_for(0, nblocks, 1, run_range);
  }
  // A failing kernel raises here (on a GPU the error would surface at the next
  // synchronisation); the error is not left behind for later launches.
  if (!errors.empty()) TORCH_CHECK(false, errors[0]);
}

cudaError_t func_set_attribute(const void* fn, int attr, int value) {
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || static_cast<size_t>(value) > device_properties().sharedMemPerBlockOptin) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(g_attr_mu);
  g_max_dyn[fn] = value;
  return cudaSuccess;
}

cudaError_t occupancy(int* blocks, const void* fn, int block_size, size_t smem) {
  const cudaDeviceProp& p = device_properties();
  if (blocks == nullptr || block_size <= 0 || block_size > p.maxThreadsPerBlock) return cudaErrorInvalidValue;
  if (smem > smem_limit_of(fn)) {
    *blocks = 0;
    return cudaSuccess;
  }
  const int warps = (block_size + kWarp - 1) / kWarp;
  int n = std::min(p.maxBlocksPerMultiProcessor, p.maxThreadsPerMultiProcessor / (warps * kWarp));
  n = std::min<int>(n, static_cast<int>(p.sharedMemPerMultiprocessor / (smem + p.reservedSharedMemPerBlock)));
  *blocks = n;  // registers are not modelled
  return cudaSuccess;
}

cudaError_t get_last_error(bool clear) {
  return static_cast<cudaError_t>(clear ? g_last_error.exchange(cudaSuccess) : g_last_error.load());
}

const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorInvalidDeviceFunction:
      return "invalid device function";
    case cudaErrorLaunchOutOfResources:
      return "too many resources requested for launch";
    case cudaErrorAssert:
      return "device-side assert triggered";
    case cudaErrorNotSupported:
      return "operation not supported";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
  }
  return "unknown error";
}

const cudaDeviceProp& device_properties() {
  static const cudaDeviceProp h100 = make_props(true), a100 = make_props(false);
  return device_choice() == 0 ? h100 : a100;
}

void check_device(c10::Device d, const char* what) {
  TORCH_CHECK(d.is_cpu(), what, ": the emulated CUDA kernels run on CPU tensors (the emulated GPU), got device ", d);
}

OpScope::OpScope() {
  if (tls_scope_depth++ == 0) tls_dev.clear();
}
OpScope::~OpScope() {
  if (--tls_scope_depth == 0) tls_dev.clear();
}
void OpScope::add(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage() || !t.is_cpu()) return;
  const auto& s = t.storage();
  record_range(s.data(), s.nbytes());
}

}  // namespace emu
}  // namespace sslops

// ===========================================================================
// ThreadSanitizer entry points (called by the instrumented kernels)
// ===========================================================================
using sslops::emu::on_access;
using sslops::emu::on_atomic;

#define SSLOPS_EMU_EXPORT extern "C" __attribute__((visibility("default")))

SSLOPS_EMU_EXPORT void __tsan_init() {}
SSLOPS_EMU_EXPORT void __tsan_func_entry(void*) {}
SSLOPS_EMU_EXPORT void __tsan_func_exit() {}
#define SSLOPS_EMU_RW(n)                                                                          \
  SSLOPS_EMU_EXPORT void __tsan_read##n(void* p) { on_access(p, n, false); }                     \
  SSLOPS_EMU_EXPORT void __tsan_write##n(void* p) { on_access(p, n, true); }                     \
  SSLOPS_EMU_EXPORT void __tsan_unaligned_read##n(void* p) { on_access(p, n, false); }           \
  SSLOPS_EMU_EXPORT void __tsan_unaligned_write##n(void* p) { on_access(p, n, true); }           \
  SSLOPS_EMU_EXPORT void __tsan_volatile_read##n(void* p) { on_access(p, n, false); }            \
  SSLOPS_EMU_EXPORT void __tsan_volatile_write##n(void* p) { on_access(p, n, true); }            \
  SSLOPS_EMU_EXPORT void __tsan_unaligned_volatile_read##n(void* p) { on_access(p, n, false); }  \
  SSLOPS_EMU_EXPORT void __tsan_unaligned_volatile_write##n(void* p) { on_access(p, n, true); }
SSLOPS_EMU_RW(1)
SSLOPS_EMU_RW(2)
SSLOPS_EMU_RW(4)
SSLOPS_EMU_RW(8)
SSLOPS_EMU_RW(16)
#undef SSLOPS_EMU_RW
SSLOPS_EMU_EXPORT void __tsan_read_range(void* p, unsigned long n) { on_access(p, n, false); }
SSLOPS_EMU_EXPORT void __tsan_write_range(void* p, unsigned long n) { on_access(p, n, true); }
SSLOPS_EMU_EXPORT void __tsan_vptr_update(void** p, void*) { on_access(p, sizeof(void*), true); }
SSLOPS_EMU_EXPORT void __tsan_vptr_read(void** p) { on_access(p, sizeof(void*), false); }

// Atomics: performed for real (blocks may run on several OS threads), sequentially consistent.
#define SSLOPS_EMU_ATOMICS(bits, T)                                                                           \
  SSLOPS_EMU_EXPORT T __tsan_atomic##bits##_load(const volatile T* a, int) {                                 \
    on_atomic(a, sizeof(T));                                                                                 \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                             \
  }                                                                                                          \
  SSLOPS_EMU_EXPORT void __tsan_atomic##bits##_store(volatile T* a, T v, int) {                              \
    on_atomic(a, sizeof(T));                                                                                 \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                                \
  }                                                                                                          \
  SSLOPS_EMU_EXPORT T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) {                              \
    on_atomic(a, sizeof(T));                                                                                 \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                      \
  }                                                                                                          \
  SSLOPS_EMU_EXPORT T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) {                             \
    on_atomic(a, sizeof(T));                                                                                 \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                          \
  SSLOPS_EMU_EXPORT T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) {                             \
    on_atomic(a, sizeof(T));                                                                                 \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                          \
  SSLOPS_EMU_EXPORT T __tsan_atomic##bits##_fetch_and(volatile T* a, T v, int) {                             \
    on_atomic(a, sizeof(T));                                                                                 \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                          \
  SSLOPS_EMU_EXPORT T __tsan_atomic##bits##_fetch_or(volatile T* a, T v, int) {                              \
    on_atomic(a, sizeof(T));                                                                                 \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                                        \
  }                                                                                                          \
  SSLOPS_EMU_EXPORT T __tsan_atomic##bits##_fetch_xor(volatile T* a, T v, int) {                             \
    on_atomic(a, sizeof(T));                                                                                 \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                          \
  SSLOPS_EMU_EXPORT T __tsan_atomic##bits##_fetch_nand(volatile T* a, T v, int) {                            \
    on_atomic(a, sizeof(T));                                                                                 \
    return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                                      \
  }                                                                                                          \
  SSLOPS_EMU_EXPORT int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {  \
    on_atomic(a, sizeof(T));                                                                                 \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
  }                                                                                                          \
  SSLOPS_EMU_EXPORT int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {    \
    on_atomic(a, sizeof(T));                                                                                 \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
  }                                                                                                          \
  SSLOPS_EMU_EXPORT T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {        \
    on_atomic(a, sizeof(T));                                                                                 \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                        \
    return c;                                                                                                \
  }
SSLOPS_EMU_ATOMICS(8, uint8_t)
SSLOPS_EMU_ATOMICS(16, uint16_t)
SSLOPS_EMU_ATOMICS(32, uint32_t)
SSLOPS_EMU_ATOMICS(64, uint64_t)
#undef SSLOPS_EMU_ATOMICS
SSLOPS_EMU_EXPORT void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
SSLOPS_EMU_EXPORT void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

// ===========================================================================
// Control ops of the emulator (tests and sslops/_emu.py)
// ===========================================================================
namespace {
void emu_set_device(c10::string_view name) {
  TORCH_CHECK(name == "h100" || name == "a100", "sslops emulator: the device must be 'h100' or 'a100', got '",
              std::string(name), "'");
  sslops::emu::g_device.store(name == "h100" ? 0 : 1);
}
std::string emu_device() { return sslops::emu::device_choice() == 0 ? "h100" : "a100"; }
std::vector<int64_t> emu_stats() {
  return {sslops::emu::g_launches.load(), sslops::emu::g_blocks.load(), sslops::emu::g_threads.load(),
          sslops::emu::g_collectives.load()};
}
void emu_set_threads(int64_t n) { sslops::emu::g_host_threads.store(static_cast<int>(n)); }
void emu_install() { sslops::emu::install_allocator(); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(sslops_emu, m) {
  m.def("_emu_set_device(str name) -> ()", &emu_set_device);
  m.def("_emu_device() -> str", &emu_device);
  m.def("_emu_stats() -> int[]", &emu_stats);
  m.def("_emu_set_threads(int n) -> ()", &emu_set_threads);
  emu_install();
}
