// What the fused CPU recurrences (lstm_cpu.cc, gru_cpu.cc, elman_cpu.cc) share: vector math, the
// register-blocked products with W_hh and W_hh^T, the packed weight layouts, a decoding step's
// input projection, the steps that spread one recurrence over the calling thread and
// XLA's intra-op pool, and shape checks.
//
// Every kernel follows the same plan. The input projection a = W_xh x (all steps) and the weight
// gradients stay in XLA as single matmuls; a kernel call runs the whole recurrence of one
// direction of BPTT. Each step is cut into chunks of hidden units; a chunk's part of the
// recurrent product is register-blocked (up to kRows batch rows x kUnitVectors vectors of units or
// gates) and its gate arithmetic is applied right after it, on the sums of the block. Each thread
// owns a run of chunks and claims them first at every step, taking another's only when that one is
// late (Steps); a chunk of step s waits until every chunk of step s - 1 is done.
//
// Each .cc file includes this header once and is its own library, so everything here has
// internal linkage.

#ifndef RNN_JAX_CSRC_RNN_CPU_H_
#define RNN_JAX_CSRC_RNN_CPU_H_

#if defined(__linux__)
#include <sched.h>
#endif

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int64_t kWidth = 16;
#elif defined(__AVX__)
constexpr int64_t kWidth = 8;
#else
constexpr int64_t kWidth = 4;
#endif

// The vector math and the products are always inlined. Left to GCC's unit-wide growth limits, the
// GRU's backward, its source unchanged, ran 20% slower (reset_before, H=512) once the forward's
// blocks grew: AccumulatePanels was then called out of line, with its sums kept in memory.
#define RNN_JAX_ALWAYS_INLINE inline __attribute__((always_inline))

typedef float Vec __attribute__((vector_size(kWidth * sizeof(float))));
typedef int32_t IntVec __attribute__((vector_size(kWidth * sizeof(float))));

// A register block of a product holds R batch rows x V vectors of sums, with the V weight
// vectors of one k beside them. AVX-512 has 32 registers: 6 rows x 4 vectors + 4 (LSTM, B=32,
// T=128 on 2 cores, H=256: forward 9.5 -> 7.2 ms, backward 7.7 -> 6.3 ms against 4 rows). AVX2
// has 16: 6 rows x 2 vectors + 2, the classic 6 x 16 float GEMM block, which loads each weight
// vector once per 6 FMAs (2 rows x 4 vectors loaded it once per 2, and that streamed W_hh
// through L2 at its bandwidth).
// Blocks over more gates than that (the LSTM's 4, the GRU's 3) run in passes of kUnitVectors
// gates (AccumulateGatesInPasses).
constexpr int kRows = 6;
constexpr int kUnitVectors = kWidth == 16 ? 4 : 2;  // vectors per block (of units, or of gates)

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

inline Vec Splat(float x) { return Vec{} + x; }

// exp(x) for x in float range: 2^n p(r), x = n ln2 + r, |r| <= ln2 / 2, with a
// degree-6 polynomial for e^r (relative error about 2e-7 after rounding).
RNN_JAX_ALWAYS_INLINE Vec Exp(Vec x) {
  // The clamp as max and min instructions (a compare and a blend each otherwise: LSTM forward 3-8%
  // faster on AVX2). They return their second operand when either is NaN, so x goes second: NaN
  // stays NaN.
#if defined(__AVX512F__)
  x = (Vec)_mm512_min_ps((__m512)Splat(88.0f), _mm512_max_ps((__m512)Splat(-87.0f), (__m512)x));
#elif defined(__AVX__)
  x = (Vec)_mm256_min_ps((__m256)Splat(88.0f), _mm256_max_ps((__m256)Splat(-87.0f), (__m256)x));
#else
  x = x < -87.0f ? Splat(-87.0f) : x;
  x = x > 88.0f ? Splat(88.0f) : x;
#endif
  const Vec round_magic = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  Vec n = (x * 1.44269504088896341f + round_magic) - round_magic;
  Vec r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  Vec p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  IntVec bits = (__builtin_convertvector(n, IntVec) + 127) << 23;
  return p * (Vec)bits;
}

RNN_JAX_ALWAYS_INLINE Vec Sigmoid(Vec x) { return 1.0f / (1.0f + Exp(-x)); }

RNN_JAX_ALWAYS_INLINE Vec Tanh(Vec x) { return 1.0f - 2.0f / (Exp(x + x) + 1.0f); }

RNN_JAX_ALWAYS_INLINE Vec Relu(Vec x) { return x > 0.0f ? x : Splat(0.0f); }

// Calls fn(b0, rows) over row blocks [b0, b0 + rows) covering [0, N), rows a compile-time constant
// of at most kRows. The blocks are as even as they can be (N = 32: 6, 6, 5, 5, 5, 5, not
// 6 x 5 + 2), since a thin block loads each weight vector for fewer FMAs.
template <typename Fn>
inline void ForRowBlocks(int64_t N, Fn fn) {
  static_assert(kRows == 6, "the switch below covers heights 1 to 6");
  if (N <= 0) return;
  const int64_t blocks = (N + kRows - 1) / kRows, rows = N / blocks, taller = N % blocks;
  int64_t b0 = 0;
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t height = rows + (block < taller ? 1 : 0);
    switch (height) {
      case 6: fn(b0, std::integral_constant<int, 6>()); break;
      case 5: fn(b0, std::integral_constant<int, 5>()); break;
      case 4: fn(b0, std::integral_constant<int, 4>()); break;
      case 3: fn(b0, std::integral_constant<int, 3>()); break;
      case 2: fn(b0, std::integral_constant<int, 2>()); break;
      default: fn(b0, std::integral_constant<int, 1>()); break;
    }
    b0 += height;
  }
}

// Calls fn(u, vectors) over groups of up to kUnitVectors unit vectors covering units
// [unit_begin, unit_end) (whole vectors), vectors a compile-time constant.
template <typename Fn>
inline void ForVectorGroups(int64_t unit_begin, int64_t unit_end, Fn fn) {
  int64_t u = unit_begin;
  for (; u + kUnitVectors * kWidth <= unit_end; u += kUnitVectors * kWidth)
    fn(u, std::integral_constant<int, kUnitVectors>());
  switch ((unit_end - u) / kWidth) {  // fewer than kUnitVectors left
    case 3: if constexpr (kUnitVectors > 3) fn(u, std::integral_constant<int, 3>()); break;
    case 2: if constexpr (kUnitVectors > 2) fn(u, std::integral_constant<int, 2>()); break;
    case 1: fn(u, std::integral_constant<int, 1>()); break;
    default: break;
  }
}

// ---- packed weights and the register-blocked products ----------------------------

// Gate panels: W [rows, K] (row-major) with gate blocks of H rows, gates [first, first + Q)
// interleaved per unit vector in groups of kUnitVectors gates (the passes of
// AccumulateGatesInPasses), so that each pass of the block of one unit vector reads one contiguous
// stream: packed[v][group][k][q][lane] = W[(first + group + q) H + v kWidth + lane, k]
// (rnn_jax.kernel_build.gate_panels; grouping the passes' gates: LSTM forward 2-5% faster on AVX2).
// Reading W in place strode 4-8 KB between rows and hit cache-set aliasing. Only the panels of
// units [unit_begin, unit_end) are written (RunStepsPackingFirst: each chunk packs its own).
inline void PackGatePanels(const float* w, int64_t H, int64_t K, int64_t first, int64_t Q, float* packed,
                           int64_t unit_begin, int64_t unit_end) {
  for (int64_t v = unit_begin / kWidth; v < unit_end / kWidth; ++v)
    for (int64_t q = 0; q < Q; ++q)
      for (int64_t lane = 0; lane < kWidth; ++lane) {
        const float* row = w + ((first + q) * H + v * kWidth + lane) * K;
        const int64_t group = q - q % kUnitVectors, group_size = std::min<int64_t>(kUnitVectors, Q - group);
        float* out = packed + (v * K * Q + group * K + (q - group)) * kWidth + lane;
        for (int64_t k = 0; k < K; ++k) out[k * group_size * kWidth] = row[k];
      }
}

// Column panels for W^T d: W [rows, H] -> packed[v][n][lane] = W[n, v kWidth + lane].
inline void PackColumnPanels(const float* w, int64_t rows, int64_t H, float* packed) {
  for (int64_t v = 0; v < H / kWidth; ++v)
    for (int64_t n = 0; n < rows; ++n)
      std::memcpy(packed + (v * rows + n) * kWidth, w + n * H + v * kWidth, kWidth * sizeof(float));
}

// acc[r][q] += sum_k x[r][k] panel[k][q] for a gate panel (Q interleaved gate vectors per k).
template <int R, int Q>
RNN_JAX_ALWAYS_INLINE void AccumulateGates(Vec (&acc)[R][Q], const float* const (&x)[R], int64_t K, const float* panel) {
  for (int64_t k = 0; k < K; ++k) {
    const float* w_k = panel + k * Q * kWidth;
    Vec w[Q];
    for (int q = 0; q < Q; ++q) w[q] = Load(w_k + q * kWidth);
    for (int r = 0; r < R; ++r) {
      const float x_k = x[r][k];
      for (int q = 0; q < Q; ++q) acc[r][q] += x_k * w[q];
    }
  }
}

// AccumulateGates over all Q gates of a gate panel, in passes of at most kUnitVectors gates, so that
// each pass keeps its R x (gates) sums and its weight vectors in registers (the LSTM's 4 gates on
// AVX2: (i, f), then (g, o)). Each pass reads its own group of the panel (PackGatePanels).
template <int R, int Q, int First = 0>
RNN_JAX_ALWAYS_INLINE void AccumulateGatesInPasses(Vec (&acc)[R][Q], const float* const (&x)[R], int64_t K, const float* panel) {
  constexpr int kPass = Q - First < kUnitVectors ? Q - First : kUnitVectors;
  Vec part[R][kPass];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < kPass; ++q) part[r][q] = acc[r][First + q];
  AccumulateGates<R, kPass>(part, x, K, panel + First * K * kWidth);
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < kPass; ++q) acc[r][First + q] = part[r][q];
  if constexpr (First + kPass < Q) AccumulateGatesInPasses<R, Q, First + kPass>(acc, x, K, panel);
}

// acc[r][v] += sum_n x[r][n] panel[v][n] over V consecutive panels of `stride` rows each (the
// column panels of W^T d, or the single-gate panels of W h, whose stride is K).
template <int R, int V>
RNN_JAX_ALWAYS_INLINE void AccumulatePanels(Vec (&acc)[R][V], const float* const (&x)[R], int64_t count,
                                            const float* panel, int64_t stride) {
  for (int64_t n = 0; n < count; ++n) {
    Vec w[V];
    for (int v = 0; v < V; ++v) w[v] = Load(panel + (v * stride + n) * kWidth);
    for (int r = 0; r < R; ++r) {
      const float x_n = x[r][n];
      for (int v = 0; v < V; ++v) acc[r][v] += x_n * w[v];
    }
  }
}

// Asks for the a_t lines a block will add to its sums (rows [b0, b0 + R) of a [N, stride] slab,
// from `first` = row b0's first gate at unit u: `gates` gate blocks H apart, V vectors each) to be
// brought to L2 at the start of the block, so that they have arrived when its product is done. The
// block then adds a_t after the product: a [T, N, G H] is larger than the caches, and its loads
// missed there (B=32, T=128, a 2-core Xeon with AVX-512: LSTM forward 2-9% faster, GRU 2-10%). The
// Elman blocks read 4 contiguous vectors of a row, which the hardware prefetcher already covers
// (prefetched: within noise).
template <int R, int V = 1>
inline void PrefetchInputs(const float* first, int64_t stride, int64_t gates, int64_t H) {
  for (int r = 0; r < R; ++r)
    for (int64_t q = 0; q < gates; ++q)
      for (int v = 0; v < V; ++v) _mm_prefetch((const char*)(first + r * stride + q * H + v * kWidth), _MM_HINT_T1);
}

// ---- the hidden states a forward step reads --------------------------------------

// h_t of the last two steps, [2, N, H] (even and odd steps), written beside hs and read by the next
// step as h_{t-1} in place of hs. The rows of hs [N, T, H] for one t are T H floats apart (128 KB
// at T=128, H=256), so the 32 rows a step reads map to the same cache sets of L1 and L2; these rows
// are H floats apart. B=32, T=128, two threads on a 2-core AVX-512 Xeon, one process alternating:
// LSTM inference 1.14-1.16x at H=256 (0.97-1.00x at 512), with the gates saved 0.98-1.02x; the
// reset-after GRU's inference 1.15x / 1.02-1.04x, with the gates saved 1.03-1.05x / 0.98-1.00x; one
// thread within 1%. The reset-before GRU (1.00x at H=256, 0.98x at 512) and the Elman forward
// (19 us a step at H=256; 0.96-1.01x there, 1.03-1.05x at 512) keep reading hs. A decoding step
// (T = 1) reads only h0 and leaves `rows` null.
struct RecentHidden {
  float* rows = nullptr;
  int64_t N = 0, H = 0;

  float* Row(int64_t step, int64_t b) const { return rows + ((step % 2) * N + b) * H; }
  // Keeps units [unit, unit + kWidth) of h_t, row b, for the next step (nothing without a buffer).
  void Keep(int64_t step, int64_t b, int64_t unit, Vec h) const {
    if (rows != nullptr) Store(Row(step, b) + unit, h);
  }
};

// ---- the input projection of a decoding step ---------------------------------------

// A decoding step's a_t = W_xh x_t for rows [b0, b0 + R) and unit vector u of each of Q gates:
// a[b, q H + u + lane] = sum_k x[b, k] W_xh[q H + u + lane, k]. x: [N, F]; x_panels: the gate
// panels of W_xh ([H / kWidth][Q F kWidth], rnn_jax.kernel_build.gate_panels); a: [N, Q H].
template <int R, int Q>
inline void ProjectBlock(const float* x, int64_t F, const float* x_panels, int64_t H, int64_t b0, int64_t u,
                         float* a) {
  const float* rows[R];
  Vec acc[R][Q] = {};
  for (int r = 0; r < R; ++r) rows[r] = x + (b0 + r) * F;
  AccumulateGatesInPasses<R, Q>(acc, rows, F, x_panels + (u / kWidth) * F * Q * kWidth);
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < Q; ++q) Store(a + (b0 + r) * Q * H + q * H + u, acc[r][q]);
}

// The same for every row and the units [unit_begin, unit_end) of a chunk. The chunk's own
// recurrence then reads those units back (in the same chunk, or after the step's barrier), so a
// decoding step needs no barrier of its own for its projection.
template <int Q>
inline void ProjectChunk(const float* x, int64_t N, int64_t F, const float* x_panels, int64_t H,
                         int64_t unit_begin, int64_t unit_end, float* a) {
  for (int64_t u = unit_begin; u < unit_end; u += kWidth)
    ForRowBlocks(N, [&](int64_t b0, auto rows) { ProjectBlock<decltype(rows)::value, Q>(x, F, x_panels, H, b0, u, a); });
}

// ---- the steps of a call, spread over threads ------------------------------------

// A counter that participants wait on: spin for up to kSpin (a step's chunks take tens to hundreds
// of microseconds), then sleep in the kernel (futex) until the counter moves. Sleeping, not
// yielding, matters: it leaves the core idle, so the scheduler moves a participant that
// was preempted on another core onto it at once, instead of after a time slice. Spinning that
// long, not 2048 pauses (~0.1 ms on Intel), matters on a VM: a waiter that fell asleep left its
// vCPU idle, the host descheduled it, and waking it took milliseconds, during which the other
// thread ran the step alone. LSTM forward, B=32, T=128, two threads, 2-core AVX-512 Xeon, called
// every 0.2 s: median 46.1 -> 31.1 ms at H=512 (28.2 back to back), 11.3 -> 9.1 ms at H=256 (7.3);
// back to back unchanged. Two processes running it at once on the two cores: 6% fewer calls.
constexpr std::chrono::microseconds kSpin{500};

class Progress {
 public:
  int64_t Load() const { return count_.load(std::memory_order_acquire); }

  void Add() {
    count_.fetch_add(1, std::memory_order_acq_rel);
    if (sleepers_.load(std::memory_order_acquire) > 0) count_.notify_all();
  }

  void WaitAtLeast(int64_t target) {
    const auto deadline = std::chrono::steady_clock::now() + kSpin;
    for (int spins = 1;; ++spins) {
      if (Load() >= target) return;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if (spins % 256 == 0 && std::chrono::steady_clock::now() >= deadline) break;
    }
    sleepers_.fetch_add(1, std::memory_order_acq_rel);
    for (int64_t seen = Load(); seen < target; seen = Load()) count_.wait(seen, std::memory_order_acquire);
    sleepers_.fetch_sub(1, std::memory_order_acq_rel);
  }

 private:
  std::atomic<int64_t> count_{0};
  std::atomic<int> sleepers_{0};
};

inline int CurrentCpu() {
#if defined(__linux__)
  return sched_getcpu();
#else
  return -1;
#endif
}

// Runs work(step, chunk) for every step in order and every chunk of a step in any
// order, on the calling thread and on up to `helpers` pool threads. Participant p owns the chunks
// from p chunks / participants on and claims them first at every step, then whatever chunk of the
// step is still unclaimed, so the same thread runs the same units from step to step and its part
// of the packed W_hh stays in its own L2 (at H=512 half of the LSTM's W_hh is 2 MB, a Xeon core's
// whole L2). Against chunks dealt out in arrival order (a shared ticket counter), B=32, T=128 on a
// 2-core AVX-512 Xeon, one process alternating: LSTM forward 1.00-1.09x and backward 1.01-1.08x,
// GRU forward at H=512 1.05x, the rest within 1% but the LSTM's inference at H=256 (0.94-0.98x).
// The calling thread can claim every chunk alone, so late or missing helpers only cost speed,
// never progress.
class Steps {
 public:
  template <typename Work>
  static void Run(ffi::ThreadPool& pool, int64_t helpers, int64_t steps, int64_t chunks, Work work) {
    auto state = std::make_shared<Steps>(steps * chunks, chunks, helpers + 1);
    state->ClaimCpu(CurrentCpu());
    for (int64_t i = 0; i < helpers; ++i) {
      pool.Schedule([state, work, i]() {
        SpreadOut spread(*state);
        state->Participate(work, i + 1);
      });
    }
    state->Participate(work, 0);
    state->done_.WaitAtLeast(state->total_);
  }

  Steps(int64_t total, int64_t chunks, int64_t participants)
      : total_(total), chunks_(chunks), participants_(participants), claimed_(new std::atomic<int64_t>[chunks]) {
    for (int64_t c = 0; c < chunks; ++c) claimed_[c].store(0, std::memory_order_relaxed);
  }

 private:
  // A chunk is claimed for step s by moving its counter from s to s + 1 (claimed_[c] is the next
  // step chunk c is free for); a helper that arrives late skips the steps already done.
  template <typename Work>
  void Participate(const Work& work, int64_t index) {
    const int64_t steps = total_ / chunks_, first = index * chunks_ / participants_;
    for (int64_t step = 0; step < steps; ++step) {
      if (done_.Load() >= total_) return;
      done_.WaitAtLeast(step * chunks_);
      for (int64_t j = 0; j < chunks_; ++j) {
        const int64_t c = (first + j) % chunks_;
        int64_t expected = step;
        if (claimed_[c].load(std::memory_order_relaxed) != step) continue;
        if (!claimed_[c].compare_exchange_strong(expected, step + 1, std::memory_order_acq_rel)) continue;
        work(step, c);
        done_.Add();
      }
    }
  }

  // True if `cpu` was not yet claimed by a participant of this call (CPUs 0-63 are tracked).
  bool ClaimCpu(int cpu) {
    if (cpu < 0 || cpu >= 64) return true;
    const uint64_t bit = uint64_t{1} << cpu;
    return (cpus_.fetch_or(bit, std::memory_order_relaxed) & bit) == 0;
  }

  // A woken helper often starts on the caller's core (the scheduler's wake-up affinity) and
  // the two then share it, spinning in turn at every step, until the load balancer moves
  // one: a 7.5 ms call took 14-16 ms. SpreadOut moves a helper that finds its core
  // taken to a free allowed core for the rest of the task, and restores its affinity mask
  // afterwards, so XLA's pool thread leaves as it came.
  class SpreadOut {
   public:
#if defined(__linux__)
    explicit SpreadOut(Steps& steps) {
      if (steps.ClaimCpu(CurrentCpu())) return;
      if (sched_getaffinity(0, sizeof(original_), &original_) != 0) return;
      for (int cpu = 0; cpu < 64 && cpu < CPU_SETSIZE; ++cpu) {
        if (!CPU_ISSET(cpu, &original_) || !steps.ClaimCpu(cpu)) continue;
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(cpu, &one);
        moved_ = sched_setaffinity(0, sizeof(one), &one) == 0;
        return;
      }
    }
    ~SpreadOut() {
      if (moved_) sched_setaffinity(0, sizeof(original_), &original_);
    }

   private:
    cpu_set_t original_;
    bool moved_ = false;
#else
    explicit SpreadOut(Steps&) {}
#endif
  };

  const int64_t total_;
  const int64_t chunks_;
  const int64_t participants_;
  std::unique_ptr<std::atomic<int64_t>[]> claimed_;
  Progress done_;
  std::atomic<uint64_t> cpus_{0};
};

// Threads working on one call: the caller plus helpers from XLA's pool, at most one per
// core; RNN_JAX_KERNEL_THREADS caps it (like OMP_NUM_THREADS).
inline int64_t Participants(ffi::ThreadPool& pool) {
  int64_t limit = std::max<unsigned>(1, std::thread::hardware_concurrency());
  if (const char* cap = std::getenv("RNN_JAX_KERNEL_THREADS")) limit = std::min<int64_t>(limit, std::atoll(cap));
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), limit));
}

// Hidden units are handed out in chunks of whole vectors: chunk c of `chunks`
// covers unit vectors [begin, end).
struct Chunking {
  int64_t vectors;
  int64_t chunks;
  int64_t Begin(int64_t c) const { return c * vectors / chunks; }
  int64_t End(int64_t c) const { return (c + 1) * vectors / chunks; }
};

inline Chunking MakeChunking(int64_t hidden, int64_t participants) {
  const int64_t vectors = hidden / kWidth;
  return {vectors, std::max<int64_t>(1, std::min(vectors, 2 * participants))};
}

// Runs work(step, unit_begin, unit_end) for `steps` steps in order, each cut into chunks of
// hidden units, on the calling thread and XLA's pool.
template <typename Work>
inline void RunSteps(ffi::ThreadPool& pool, int64_t H, int64_t steps, Work work) {
  const int64_t participants = Participants(pool);
  const Chunking chunking = MakeChunking(H, participants);
  Steps::Run(pool, participants - 1, steps, chunking.chunks, [work, chunking](int64_t step, int64_t c) {
    work(step, chunking.Begin(c) * kWidth, chunking.End(c) * kWidth);
  });
}

// RunSteps for a forward call that packs W_hh: each chunk of the first step runs
// pack(unit_begin, unit_end) for its own units' panels before its work, so the threads share the
// packing instead of the caller doing it all while the helpers wait (LSTM forward 0-4.5%
// faster). A later step's chunk may read panels another thread packed: the step barrier orders it.
template <typename Pack, typename Work>
inline void RunStepsPackingFirst(ffi::ThreadPool& pool, int64_t H, int64_t steps, Pack pack, Work work) {
  RunSteps(pool, H, steps, [pack, work](int64_t step, int64_t unit_begin, int64_t unit_end) {
    if (step == 0) pack(unit_begin, unit_end);
    work(step, unit_begin, unit_end);
  });
}

// Scratch buffers (packed weights, held gradients) belong to the calling thread and only grow,
// so steady-state calls make no 1-4 MB allocation twice per train step. Helpers only touch them
// while the caller waits for every chunk, so the next call cannot overwrite them early.
class Scratch {
 public:
  float* Get(int64_t n) {
    if (n > size_) {
      std::free(data_);
      data_ = static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64));
      size_ = n;
    }
    return data_;
  }
  ~Scratch() { std::free(data_); }

 private:
  float* data_ = nullptr;
  int64_t size_ = 0;
};

// A decoding step: `phases` phases of one step (the GRU's reset-before variant has two),
// where each chunk first projects its units of x_t [N, F] into a [N, Q H] (ProjectChunk) and
// then runs work(phase, unit_begin, unit_end) on it.
template <int Q, typename Work>
inline void RunDecodingStep(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> x_panels,
                            int64_t H, float* a, int64_t phases, Work work) {
  const int64_t N = x.dimensions()[0], F = x.dimensions()[1];
  const float* x_t = x.typed_data();
  const float* panels = x_panels.typed_data();
  RunSteps(pool, H, phases, [=](int64_t phase, int64_t unit_begin, int64_t unit_end) {
    if (phase == 0) ProjectChunk<Q>(x_t, N, F, panels, H, unit_begin, unit_end, a);
    work(phase, unit_begin, unit_end);
  });
}

// ---- argument checks -------------------------------------------------------------

inline ffi::Error CheckShape(const char* kernel, const char* name, ffi::Span<const int64_t> got,
                             std::initializer_list<int64_t> want) {
  if (got.size() == want.size() && std::equal(got.begin(), got.end(), want.begin())) return ffi::Error::Success();
  std::string message = std::string("rnn_jax ") + kernel + " kernel: " + name + " has shape [";
  for (size_t i = 0; i < got.size(); ++i) message += (i ? ", " : "") + std::to_string(got[i]);
  message += "], expected [";
  size_t i = 0;
  for (int64_t d : want) message += (i++ ? ", " : "") + std::to_string(d);
  return ffi::Error::InvalidArgument(message + "]");
}

inline ffi::Error CheckHidden(const char* kernel, int64_t H) {
  if (H % kWidth == 0) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("rnn_jax ") + kernel + " kernel: H must be a multiple of " +
                                     std::to_string(kWidth) + ", got " + std::to_string(H));
}

// The decoding step's operands x_t [N, F] and the W_xh panels, checked: F, or an error naming them.
inline ffi::Error CheckStepInput(const char* kernel, ffi::Span<const int64_t> x, ffi::Span<const int64_t> panels,
                                 int64_t N, int64_t H, int64_t gates) {
  if (x.size() != 2 || x[0] != N)
    return ffi::Error::InvalidArgument(std::string("rnn_jax ") + kernel + " kernel: x must be [N, F] with N = " +
                                       std::to_string(N) + " rows, as h0");
  return CheckShape(kernel, "W_xh panels", panels, {H / kWidth, gates * x[1] * kWidth});
}

#define RETURN_IF_ERROR(expr)               \
  do {                                      \
    ffi::Error error = (expr);              \
    if (error.failure()) return error;      \
  } while (0)

}  // namespace

extern "C" int64_t rnn_jax_vector_width() { return kWidth; }
extern "C" int64_t rnn_jax_gates_per_pass() { return kUnitVectors; }

#endif  // RNN_JAX_CSRC_RNN_CPU_H_
