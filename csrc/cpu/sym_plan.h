// The tile schedule of the CPU kernels over a symmetric (M x M) matrix
// z z^T (nt_xent's symmetric kernels, sup_con): blocks of rows, the tiles
// (I, J), I <= J, in a fixed order, and a runner that executes them in
// parallel so that the tiles of each block run one at a time in that order.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace sslops {
namespace cpu_sym {

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t kSymTile = 256;

// z's M rows cut into B blocks of bs rows (the last may be shorter) and the
// tiles (I, J), I <= J, in rounds: round 0 the B diagonal tiles, then the
// B' - 1 rounds of the circle method (B' = B rounded up to even), each pairing
// every block with one other (a block paired with the dummy block B sits out).
// bs depends on M only -- never on the thread count -- and aims at >= 8 blocks
// (rounds of >= 4 tiles) down to blocks of 64 rows.
struct SymPlan {
  struct Tile {
    int64_t I, J;
    int64_t pos_I, pos_J;  // how many earlier tiles hold block I (J)
  };
  int64_t M = 0, bs = 1, B = 0, ld = 0;
  std::vector<Tile> tiles;  // round by round

  explicit SymPlan(int64_t m, int64_t lanes) : M(m) {
    const int64_t cap = std::min<int64_t>(kSymTile, std::max<int64_t>(64, div_up(M, 8)));
    B = div_up(M, cap);
    bs = div_up(M, B);  // equal blocks: 1026 -> 7 x 129 + 123 (not 8 x 128 + 2)
    B = div_up(M, bs);
    ld = div_up(bs, lanes) * lanes;
    std::vector<int64_t> seen(B, 0);
    auto add = [&](int64_t i, int64_t j) {
      tiles.push_back({i, j, seen[i], seen[j]});
      ++seen[i];
      if (j != i) ++seen[j];
    };
    for (int64_t i = 0; i < B; ++i) add(i, i);
    const int64_t Bp = B + (B & 1);
    for (int64_t r = 0; r + 1 < Bp; ++r) {
      for (int64_t k = 0; k < Bp / 2; ++k) {
        const int64_t a = k == 0 ? Bp - 1 : (r + k) % (Bp - 1);
        const int64_t b = k == 0 ? r : (r - k + Bp - 1) % (Bp - 1);
        if (a < B && b < B) add(std::min(a, b), std::max(a, b));
      }
    }
  }
  int64_t row0(int64_t blk) const { return blk * bs; }
  int64_t rows(int64_t blk) const { return std::min(bs, M - blk * bs); }

  // Runs fn(I, J, thread) on every tile.  A tile is ready once every earlier
  // tile of its two blocks has finished; each thread takes the first ready tile
  // among the next kLookahead untaken ones (so a thread that the OS preempts in
  // a tile holds up only the tiles that need its blocks, and nobody waits while
  // holding a tile).  Each block's tiles thus run one at a time, in the plan's
  // order, whichever thread runs them.
  template <typename F>
  void run(const F& fn) const {
    constexpr int64_t kLookahead = 256;
    const int64_t n = static_cast<int64_t>(tiles.size());
    std::vector<std::atomic<int64_t>> done(B);  // finished tiles per block
    for (auto& d : done) d.store(0, std::memory_order_relaxed);
    std::vector<std::atomic<bool>> taken(n);
    for (auto& t : taken) t.store(false, std::memory_order_relaxed);
    std::atomic<int64_t> low{0};  // every tile below it is taken
    std::atomic<bool> failed{false};
    std::exception_ptr error;
    std::mutex error_mutex;
    auto ready = [&](const Tile& tile) {
      return done[tile.I].load(std::memory_order_acquire) >= tile.pos_I &&
             done[tile.J].load(std::memory_order_acquire) >= tile.pos_J;
    };
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      for (;;) {
        if (failed.load(std::memory_order_relaxed)) return;
        const int64_t t0 = low.load(std::memory_order_acquire);
        if (t0 >= n) return;
        int64_t pick = -1;
        for (int64_t t = t0; t < std::min(n, t0 + kLookahead) && pick < 0; ++t) {
          bool expected = false;
          if (!taken[t].load(std::memory_order_relaxed) && ready(tiles[t]) &&
              taken[t].compare_exchange_strong(expected, true))
            pick = t;
        }
        if (pick < 0) {  // the lowest untaken tile waits for a running one
          std::this_thread::yield();
          continue;
        }
        for (int64_t lw = low.load(); lw < n && taken[lw].load();)
          if (low.compare_exchange_weak(lw, lw + 1)) ++lw;
        const Tile& tile = tiles[pick];
        try {
          fn(tile.I, tile.J, at::get_thread_num());
        } catch (...) {
          std::lock_guard<std::mutex> lock(error_mutex);
          if (!error) error = std::current_exception();
          failed.store(true);
          return;
        }
        done[tile.I].fetch_add(1, std::memory_order_release);
        if (tile.J != tile.I) done[tile.J].fetch_add(1, std::memory_order_release);
      }
    });
    if (error) std::rethrow_exception(error);
  }
};

}  // namespace cpu_sym
}  // namespace sslops
