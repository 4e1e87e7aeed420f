// Fused LSTM recurrence for XLA:CPU, called from JAX through the XLA FFI.
//
// Two handlers, one per direction of BPTT, each running the whole sequence in
// one call (the CPU counterpart of a cuDNN RNN layer). The input projection
// a = W_xh x and the weight gradients dW_hh = sum_t da_t h_{t-1}^T and dW_xh stay
// in XLA, as single matmuls over all steps; only the recurrence (and b) is here.
//
// Forward, per step t (gate order i, f, g, o as in rnn_jax.cells.LSTM):
//   (i, f, g, o) = a_t + b + W_hh h_{t-1}     (b: the bias, added here to spare XLA a pass over a)
//   c_t = sigma(f) c_{t-1} + sigma(i) tanh(g);   h_t = sigma(o) tanh(c_t)
//   on masked steps the carry is held: (h_t, c_t) = (h_{t-1}, c_{t-1}).
// Backward, per step t, with dh = dh_{t+1 -> t} + dL/dhs_t:
//   dc = dc_{t+1 -> t} + dh o (1 - tanh^2 c_t)
//   da_i = dc g i (1 - i);  da_f = dc c_{t-1} f (1 - f);  da_g = dc i (1 - g^2)
//   da_o = dh tanh(c_t) o (1 - o);  dh_{t-1} = W_hh^T da_t;  dc_{t-1} = dc f
//   on masked steps da_t = 0 and (dh, dc) pass through unchanged.
//
// Shapes: a, gates, da: [T, N, 4H]; cs: [T, N, H]; h0, c0, dh0, dc0: [N, H]; mask: [T, N];
// W_hh: [4H, H]; b: [4H]. hs and d_hs: [T, N, H] are stored batch-major ([N, T, H] in memory,
// the layout the caller requests through the FFI), which is how rnn_jax.rnn's batch-major
// read-out consumes and produces them: no transposes there.
//
// Each step is split into chunks of hidden units. A chunk's matmul and its gate
// arithmetic are fused: the accumulators for kRows batch rows x 4 gates x one
// vector of units stay in registers and the gates are applied there. Chunks are handed
// out by ticket to the calling thread and to helpers on XLA's intra-op thread
// pool; a ticket of step s waits until every chunk of step s - 1 is done. The
// calling thread can finish every ticket alone, so late or missing helpers only
// cost speed, never progress.

#if defined(__linux__)
#include <sched.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
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

typedef float Vec __attribute__((vector_size(kWidth * sizeof(float))));
typedef int32_t IntVec __attribute__((vector_size(kWidth * sizeof(float))));

// Batch rows per register block: 6 rows x 4 accumulators + 4 weight vectors fit the 32
// AVX-512 registers (B=32, T=128 on 2 cores, H=256: forward 9.5 -> 7.2 ms, backward
// 7.7 -> 6.3 ms against 4 rows); AVX2 has 16 registers, so 2 rows there.
constexpr int kRows = kWidth == 16 ? 6 : 2;
constexpr int64_t kUnitVectors = 4;  // unit vectors per block of the backward matmul

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

inline Vec Splat(float x) { return Vec{} + x; }

// exp(x) for x in float range: 2^n p(r), x = n ln2 + r, |r| <= ln2 / 2, with a
// degree-6 polynomial for e^r (relative error about 2e-7 after rounding).
inline Vec Exp(Vec x) {
  x = x < -87.0f ? Splat(-87.0f) : x;
  x = x > 88.0f ? Splat(88.0f) : x;
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

inline Vec Sigmoid(Vec x) { return 1.0f / (1.0f + Exp(-x)); }

inline Vec Tanh(Vec x) { return 1.0f - 2.0f / (Exp(x + x) + 1.0f); }

// Calls fn(b0, rows) over row blocks [b0, b0 + rows) covering [0, N), rows a compile-time constant.
template <typename Fn>
inline void ForRowBlocks(int64_t N, Fn fn) {
  int64_t b0 = 0;
  for (; b0 + kRows <= N; b0 += kRows) fn(b0, std::integral_constant<int, kRows>());
  switch (N - b0) {
    case 5: fn(b0, std::integral_constant<int, 5>()); break;
    case 4: fn(b0, std::integral_constant<int, 4>()); break;
    case 3: fn(b0, std::integral_constant<int, 3>()); break;
    case 2: fn(b0, std::integral_constant<int, 2>()); break;
    case 1: fn(b0, std::integral_constant<int, 1>()); break;
    default: break;
  }
}

// A counter that participants wait on: spin briefly (a step's chunks take tens of
// microseconds), then sleep in the kernel (futex) until the counter moves. Sleeping, not
// yielding, matters: it leaves the core idle, so the scheduler moves a participant that
// was preempted on another core onto it at once, instead of after a time slice.
class Progress {
 public:
  int64_t Load() const { return count_.load(std::memory_order_acquire); }

  void Add() {
    count_.fetch_add(1, std::memory_order_acq_rel);
    if (sleepers_.load(std::memory_order_acquire) > 0) count_.notify_all();
  }

  void WaitAtLeast(int64_t target) {
    for (int spins = 0; spins < 2048; ++spins) {
      if (Load() >= target) return;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    sleepers_.fetch_add(1, std::memory_order_acq_rel);
    for (int64_t seen = Load(); seen < target; seen = Load()) count_.wait(seen, std::memory_order_acquire);
    sleepers_.fetch_sub(1, std::memory_order_acq_rel);
  }

 private:
  std::atomic<int64_t> count_{0};
  std::atomic<int> sleepers_{0};
};

// ---- ticketed steps ------------------------------------------------------------

inline int CurrentCpu() {
#if defined(__linux__)
  return sched_getcpu();
#else
  return -1;
#endif
}

// Runs work(step, chunk) for every step in order and every chunk of a step in any
// order, on the calling thread and on up to `helpers` pool threads.
class Steps {
 public:
  template <typename Work>
  static void Run(ffi::ThreadPool& pool, int64_t helpers, int64_t steps, int64_t chunks, Work work) {
    auto state = std::make_shared<Steps>(steps * chunks, chunks);
    state->ClaimCpu(CurrentCpu());
    for (int64_t i = 0; i < helpers; ++i) {
      pool.Schedule([state, work]() {
        SpreadOut spread(*state);
        state->Participate(work);
      });
    }
    state->Participate(work);
    state->done_.WaitAtLeast(state->total_);
  }

  Steps(int64_t total, int64_t chunks) : total_(total), chunks_(chunks) {}

 private:
  template <typename Work>
  void Participate(const Work& work) {
    for (;;) {
      const int64_t ticket = next_.fetch_add(1, std::memory_order_relaxed);
      if (ticket >= total_) return;
      const int64_t step = ticket / chunks_;
      done_.WaitAtLeast(step * chunks_);
      work(step, ticket % chunks_);
      done_.Add();
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
  std::atomic<int64_t> next_{0};
  Progress done_;
  std::atomic<uint64_t> cpus_{0};
};

// Threads working on one call: the caller plus helpers from XLA's pool, at most one per
// core; RNN_JAX_KERNEL_THREADS caps it (like OMP_NUM_THREADS).
int64_t Participants(ffi::ThreadPool& pool) {
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

Chunking MakeChunking(int64_t hidden, int64_t participants) {
  const int64_t vectors = hidden / kWidth;
  return {vectors, std::max<int64_t>(1, std::min(vectors, 2 * participants))};
}

// ---- forward --------------------------------------------------------------------

// W_hh [4H, H] repacked so that a block's loads are one contiguous stream.
//   forward:  [H / kWidth][H][4][kWidth]: unit vector, k, gate, lane = W_hh[q H + u + lane, k]
//   backward: [H / kWidth][4H][kWidth]:   unit vector, n, lane       = W_hh[n, u + lane]
//
// Scratch buffers (the packed W_hh, dh_total) belong to the calling thread and only grow, so
// steady-state calls make no 1-4 MB allocation twice per train step. Helpers only touch them
// while the caller waits for every ticket, so the next call cannot overwrite them early.
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

void PackForward(const float* w_hh, int64_t H, float* packed) {
  for (int64_t v = 0; v < H / kWidth; ++v)
    for (int64_t q = 0; q < 4; ++q)
      for (int64_t lane = 0; lane < kWidth; ++lane) {
        const float* row = w_hh + (q * H + v * kWidth + lane) * H;
        float* out = packed + (v * H * 4 + q) * kWidth + lane;
        for (int64_t k = 0; k < H; ++k) out[k * 4 * kWidth] = row[k];
      }
}

void PackBackward(const float* w_hh, int64_t H, float* packed) {
  for (int64_t v = 0; v < H / kWidth; ++v)
    for (int64_t n = 0; n < 4 * H; ++n)
      std::memcpy(packed + (v * 4 * H + n) * kWidth, w_hh + n * H + v * kWidth, kWidth * sizeof(float));
}

struct Forward {
  const float* a;     // [T, N, 4H]
  const float* bias;  // [4H], added to every a_t
  const float* w_packed;
  const bool* mask;
  const float* h0;
  const float* c0;
  float* hs;  // batch-major [N, T, H]
  float* cs;
  float* gates;  // null when the gates are not saved
  int64_t T, N, H;
  bool reverse;

  int64_t Time(int64_t step) const { return reverse ? T - 1 - step : step; }
  float* HiddenRow(int64_t t, int64_t b) const { return hs + (b * T + t) * H; }
  const float* PreviousHiddenRow(int64_t step, int64_t b) const {
    return step == 0 ? h0 + b * H : HiddenRow(Time(step - 1), b);
  }
  const float* PreviousCellRow(int64_t step, int64_t b) const {
    return step == 0 ? c0 + b * H : cs + (Time(step - 1) * N + b) * H;
  }

  // Rows [b0, b0 + R) and units [u, u + kWidth) of step `step`.
  template <int R>
  void Block(int64_t step, int64_t b0, int64_t u) const {
    const int64_t t = Time(step), G = 4 * H;
    const float* h_prev[R];
    Vec acc[R][4];
    for (int r = 0; r < R; ++r) {
      h_prev[r] = PreviousHiddenRow(step, b0 + r);
      const float* a_t = a + (t * N + b0 + r) * G + u;
      for (int q = 0; q < 4; ++q) acc[r][q] = Load(a_t + q * H) + Load(bias + q * H + u);
    }
    const float* panel = w_packed + (u / kWidth) * H * 4 * kWidth;
    for (int64_t k = 0; k < H; ++k) {
      const float* w = panel + k * 4 * kWidth;
      const Vec w_i = Load(w), w_f = Load(w + kWidth), w_g = Load(w + 2 * kWidth), w_o = Load(w + 3 * kWidth);
      for (int r = 0; r < R; ++r) {
        const float h = h_prev[r][k];
        acc[r][0] += h * w_i;
        acc[r][1] += h * w_f;
        acc[r][2] += h * w_g;
        acc[r][3] += h * w_o;
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t b = b0 + r;
      const Vec i = Sigmoid(acc[r][0]), f = Sigmoid(acc[r][1]), g = Tanh(acc[r][2]),
                o = Sigmoid(acc[r][3]);
      Vec c = Load(PreviousCellRow(step, b) + u);
      Vec h = Load(h_prev[r] + u);
      if (mask == nullptr || mask[t * N + b]) {
        c = f * c + i * g;
        h = o * Tanh(c);
      }
      Store(cs + (t * N + b) * H + u, c);
      Store(HiddenRow(t, b) + u, h);
      if (gates != nullptr) {
        float* saved = gates + (t * N + b) * G + u;
        Store(saved, i);
        Store(saved + H, f);
        Store(saved + 2 * H, g);
        Store(saved + 3 * H, o);
      }
    }
  }

  void Chunk(int64_t step, int64_t unit_begin, int64_t unit_end) const {
    for (int64_t u = unit_begin; u < unit_end; u += kWidth)
      ForRowBlocks(N, [&](int64_t b0, auto rows) { Block<decltype(rows)::value>(step, b0, u); });
  }
};

// ---- backward -------------------------------------------------------------------

struct Backward {
  const float* gates;
  const float* cs;
  const float* c0;
  const float* w_packed;
  const float* d_hs;  // batch-major [N, T, H]
  const bool* mask;
  float* da;
  float* dh;        // [N, H]: dh_{t+1 -> t} before the step, dh_{t -> t-1} after; ends as dh0
  float* dc;        // [N, H]: likewise for c; ends as dc0
  float* dh_total;  // [N, H] scratch: dh + d_hs_t of the last step, passed on where masked
  int64_t T, N, H;
  bool reverse;

  int64_t Time(int64_t step) const { return reverse ? T - 1 - step : step; }
  bool Valid(int64_t t, int64_t b) const { return mask == nullptr || mask[t * N + b]; }

  // dh[b, u : u + V kWidth] = W_hh^T da_t for rows [b0, b0 + R); rows masked at t take dh_total.
  template <int R, int V>
  void BackThroughWeight(int64_t t, int64_t b0, int64_t u) const {
    const int64_t G = 4 * H;
    const float* da_t = da + t * N * G;
    Vec acc[R][V] = {};
    const float* panel = w_packed + (u / kWidth) * G * kWidth;
    for (int64_t n = 0; n < G; ++n) {
      Vec w[V];
      for (int v = 0; v < V; ++v) w[v] = Load(panel + (v * G + n) * kWidth);
      for (int r = 0; r < R; ++r) {
        const float d = da_t[(b0 + r) * G + n];
        for (int v = 0; v < V; ++v) acc[r][v] += d * w[v];
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t b = b0 + r;
      const bool valid = Valid(t, b);
      for (int v = 0; v < V; ++v) {
        const int64_t offset = b * H + u + v * kWidth;
        Store(dh + offset, valid ? acc[r][v] : Load(dh_total + offset));
      }
    }
  }

  template <int R>
  void BackThroughWeightRows(int64_t t, int64_t b0, int64_t u, int64_t vectors) const {
    for (; vectors >= kUnitVectors; vectors -= kUnitVectors, u += kUnitVectors * kWidth)
      BackThroughWeight<R, kUnitVectors>(t, b0, u);
    switch (vectors) {
      case 3: BackThroughWeight<R, 3>(t, b0, u); break;
      case 2: BackThroughWeight<R, 2>(t, b0, u); break;
      case 1: BackThroughWeight<R, 1>(t, b0, u); break;
      default: break;
    }
  }

  void BackThroughWeightChunk(int64_t t, int64_t unit_begin, int64_t unit_end) const {
    const int64_t vectors = (unit_end - unit_begin) / kWidth;
    ForRowBlocks(N, [&](int64_t b0, auto rows) {
      BackThroughWeightRows<decltype(rows)::value>(t, b0, unit_begin, vectors);
    });
  }

  // The gate arithmetic of forward step `step` for units [unit_begin, unit_end), all rows.
  void GateChunk(int64_t step, int64_t unit_begin, int64_t unit_end) const {
    const int64_t t = Time(step), G = 4 * H;
    const float* c_prev = step == 0 ? c0 : cs + Time(step - 1) * N * H;
    for (int64_t b = 0; b < N; ++b) {
      const bool valid = Valid(t, b);
      for (int64_t u = unit_begin; u < unit_end; u += kWidth) {
        const int64_t offset = b * H + u;
        const Vec dh_t = Load(dh + offset) + Load(d_hs + (b * T + t) * H + u);
        Store(dh_total + offset, dh_t);
        float* da_t = da + (t * N + b) * G + u;
        if (!valid) {
          for (int q = 0; q < 4; ++q) Store(da_t + q * H, Splat(0.0f));
          continue;
        }
        const float* saved = gates + (t * N + b) * G + u;
        const Vec i = Load(saved), f = Load(saved + H), g = Load(saved + 2 * H), o = Load(saved + 3 * H);
        const Vec tanh_c = Tanh(Load(cs + t * N * H + offset));
        const Vec dc_t = Load(dc + offset) + dh_t * o * (1.0f - tanh_c * tanh_c);
        Store(da_t, dc_t * g * i * (1.0f - i));
        Store(da_t + H, dc_t * Load(c_prev + offset) * f * (1.0f - f));
        Store(da_t + 2 * H, dc_t * i * (1.0f - g * g));
        Store(da_t + 3 * H, dh_t * tanh_c * o * (1.0f - o));
        Store(dc + offset, dc_t * f);
      }
    }
  }
};

// ---- handlers -------------------------------------------------------------------

ffi::Error CheckShape(const char* name, ffi::Span<const int64_t> got, std::initializer_list<int64_t> want) {
  if (got.size() == want.size() && std::equal(got.begin(), got.end(), want.begin())) return ffi::Error::Success();
  std::string message = std::string("rnn_jax lstm kernel: ") + name + " has shape [";
  for (size_t i = 0; i < got.size(); ++i) message += (i ? ", " : "") + std::to_string(got[i]);
  message += "], expected [";
  size_t i = 0;
  for (int64_t d : want) message += (i++ ? ", " : "") + std::to_string(d);
  return ffi::Error::InvalidArgument(message + "]");
}

#define RETURN_IF_ERROR(expr)               \
  do {                                      \
    ffi::Error error = (expr);              \
    if (error.failure()) return error;      \
  } while (0)

ffi::Error LstmForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> w_hh,
                           ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                           ffi::Buffer<ffi::PRED> mask, int64_t reverse, int64_t save_gates, int64_t use_mask,
                           ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> cs,
                           ffi::ResultBuffer<ffi::F32> gates) {
  auto dims = a.dimensions();
  if (dims.size() != 3 || dims[2] % 4 != 0)
    return ffi::Error::InvalidArgument("rnn_jax lstm kernel: a must be [T, N, 4H]");
  const int64_t T = dims[0], N = dims[1], H = dims[2] / 4;
  if (H % kWidth != 0)
    return ffi::Error::InvalidArgument("rnn_jax lstm kernel: H must be a multiple of " + std::to_string(kWidth));
  RETURN_IF_ERROR(CheckShape("W_hh", w_hh.dimensions(), {4 * H, H}));
  RETURN_IF_ERROR(CheckShape("b", bias.dimensions(), {4 * H}));
  RETURN_IF_ERROR(CheckShape("h0", h0.dimensions(), {N, H}));
  RETURN_IF_ERROR(CheckShape("c0", c0.dimensions(), {N, H}));
  if (use_mask) RETURN_IF_ERROR(CheckShape("mask", mask.dimensions(), {T, N}));
  RETURN_IF_ERROR(CheckShape("hs", hs->dimensions(), {T, N, H}));
  RETURN_IF_ERROR(CheckShape("cs", cs->dimensions(), {T, N, H}));
  if (save_gates) RETURN_IF_ERROR(CheckShape("gates", gates->dimensions(), {T, N, 4 * H}));
  if (T == 0 || N == 0) return ffi::Error::Success();

  thread_local Scratch packed;
  float* w_packed = packed.Get(4 * H * H);
  PackForward(w_hh.typed_data(), H, w_packed);
  const Forward forward{a.typed_data(), bias.typed_data(), w_packed, use_mask ? mask.typed_data() : nullptr,
                        h0.typed_data(), c0.typed_data(), hs->typed_data(), cs->typed_data(),
                        save_gates ? gates->typed_data() : nullptr, T, N, H, reverse != 0};
  const int64_t participants = Participants(pool);
  const Chunking chunking = MakeChunking(H, participants);
  Steps::Run(pool, participants - 1, T, chunking.chunks, [&forward, chunking](int64_t step, int64_t c) {
    forward.Chunk(step, chunking.Begin(c) * kWidth, chunking.End(c) * kWidth);
  });
  return ffi::Error::Success();
}

ffi::Error LstmBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gates, ffi::Buffer<ffi::F32> cs,
                            ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> d_hs,
                            ffi::Buffer<ffi::F32> dh_last, ffi::Buffer<ffi::F32> dc_last,
                            ffi::Buffer<ffi::PRED> mask, int64_t reverse, int64_t use_mask,
                            ffi::ResultBuffer<ffi::F32> da, ffi::ResultBuffer<ffi::F32> dh0,
                            ffi::ResultBuffer<ffi::F32> dc0) {
  auto dims = cs.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("rnn_jax lstm kernel: cs must be [T, N, H]");
  const int64_t T = dims[0], N = dims[1], H = dims[2];
  if (H % kWidth != 0)
    return ffi::Error::InvalidArgument("rnn_jax lstm kernel: H must be a multiple of " + std::to_string(kWidth));
  RETURN_IF_ERROR(CheckShape("gates", gates.dimensions(), {T, N, 4 * H}));
  RETURN_IF_ERROR(CheckShape("c0", c0.dimensions(), {N, H}));
  RETURN_IF_ERROR(CheckShape("W_hh", w_hh.dimensions(), {4 * H, H}));
  RETURN_IF_ERROR(CheckShape("d_hs", d_hs.dimensions(), {T, N, H}));
  RETURN_IF_ERROR(CheckShape("dh_T", dh_last.dimensions(), {N, H}));
  RETURN_IF_ERROR(CheckShape("dc_T", dc_last.dimensions(), {N, H}));
  if (use_mask) RETURN_IF_ERROR(CheckShape("mask", mask.dimensions(), {T, N}));
  RETURN_IF_ERROR(CheckShape("da", da->dimensions(), {T, N, 4 * H}));
  std::memcpy(dh0->typed_data(), dh_last.typed_data(), N * H * sizeof(float));
  std::memcpy(dc0->typed_data(), dc_last.typed_data(), N * H * sizeof(float));
  if (T == 0 || N == 0) return ffi::Error::Success();

  thread_local Scratch packed, held;
  float* w_packed = packed.Get(4 * H * H);
  float* dh_total = held.Get(N * H);
  PackBackward(w_hh.typed_data(), H, w_packed);
  const Backward backward{gates.typed_data(), cs.typed_data(), c0.typed_data(), w_packed,
                          d_hs.typed_data(), use_mask ? mask.typed_data() : nullptr, da->typed_data(),
                          dh0->typed_data(), dc0->typed_data(), dh_total, T, N, H, reverse != 0};
  const int64_t participants = Participants(pool);
  const Chunking chunking = MakeChunking(H, participants);
  // Ticket step k handles forward step T - 1 - k: first dh for it from the da of
  // forward step T - k (the chunk's units only), then its gate arithmetic. Step T
  // only takes dh0 = W_hh^T da_0.
  Steps::Run(pool, participants - 1, T + 1, chunking.chunks, [&backward, chunking, T](int64_t k, int64_t c) {
    const int64_t unit_begin = chunking.Begin(c) * kWidth, unit_end = chunking.End(c) * kWidth;
    if (k > 0) backward.BackThroughWeightChunk(backward.Time(T - k), unit_begin, unit_end);
    if (k < T) backward.GateChunk(T - 1 - k, unit_begin, unit_end);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnJaxLstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // a
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c0
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Attr<int64_t>("reverse")
                                  .Attr<int64_t>("save_gates")
                                  .Attr<int64_t>("use_mask")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // hs
                                  .Ret<ffi::Buffer<ffi::F32>>()   // cs
                                  .Ret<ffi::Buffer<ffi::F32>>()); // gates

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnJaxLstmBackward, LstmBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gates
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cs
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c0
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d_hs
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dh_T
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dc_T
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Attr<int64_t>("reverse")
                                  .Attr<int64_t>("use_mask")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // da
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dh0
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dc0

extern "C" int64_t rnn_jax_vector_width() { return kWidth; }
