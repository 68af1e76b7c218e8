// A host emulation of the CUDA execution model, enough to run this project's framework-free kernels
// (csrc/cuda/*.cu) with g++ on a machine without a GPU: every CUDA thread is a fiber; a CTA's fibers run
// cooperatively in one OS thread and switch at every barrier and warp collective (__syncthreads,
// shuffles, ldmatrix, mma), so the kernels' own index and fragment code runs unchanged. Only
// csrc/cuda/ptx.cuh is replaced (include/cuda/ptx.cuh), by implementations written from the PTX ISA.
//
// What it catches beyond wrong layouts: a fiber schedule that changes at every round (forward, reverse,
// shuffled, or skewed: warp w runs one round in w % 4 + 1, so warps drift apart by many steps and a
// missing __syncthreads shows up as a wrong result), cp.async copies landing either at issue
// or only at the wait (a read before the wait, or a write into a buffer still being read), a collective
// reached by part of a warp (deadlock, reported), shared memory starting as NaN bytes, misaligned
// ldmatrix / cp.async addresses, and (with dllm_emu_alloc's guard pages) reads past a global buffer.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

// CUDA's device math lives in the global namespace.
using std::isfinite;
using std::isinf;
using std::isnan;

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 {
  uint32_t x, y;
};
struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint2 make_uint2(uint32_t x, uint32_t y) { return {x, y}; }
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }

// The running fiber's coordinates (set by the scheduler before it resumes a fiber).
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace dllm_emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s (block %u,%u,%u thread %u)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x);
  std::fflush(stderr);
  std::_Exit(3);
}

constexpr int kWarp = 32;
constexpr int kSlotWords = 9;  // 32-bit words a lane may contribute to one collective
constexpr size_t kStackBytes = 256 * 1024;

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes, src_bytes;
  void run() const {
    if (src_bytes) std::memcpy(dst, src, src_bytes);
    std::memset(dst + src_bytes, 0, bytes - src_bytes);
  }
};

struct Fiber {
  ucontext_t ctx;
  std::vector<unsigned char> stack;
  bool done = false;
  uint3 tid{};
  unsigned collectives = 0;  // warp collectives passed: picks the slot buffer
  std::vector<std::vector<Copy>> committed;
  std::vector<Copy> open;
};

struct Barrier {
  int size = 0, arrived = 0;
  unsigned generation = 0;
};

struct Config {
  int sms = 8;
  int schedule = 0;  // 0 forward, 1 reverse, 2 shuffled, 3 skewed; the order also rotates every round
  bool copies_at_issue = false;  // cp.async lands at issue (else at the wait)
};

struct Cta {
  std::vector<Fiber> fibers;
  ucontext_t main{};
  int current = -1;
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<uint32_t> slots;  // [2][warps][32][kSlotWords]
  std::vector<unsigned char> dynamic_smem;
  uint64_t progress = 0;
  std::function<void()> body;
};

inline Config config;
inline Cta cta;
constexpr size_t kDefaultSmemBytes = 48 * 1024;  // above it a kernel must opt in (cudaFuncSetAttribute)
constexpr size_t kMaxSmemBytes = 163 * 1024;      // sm_80's opt-in limit per CTA (sm_90a: 227 KB)
inline std::map<const void*, size_t> smem_opt_in;

inline Fiber& me() { return cta.fibers[cta.current]; }
inline int linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

inline void yield() { swapcontext(&me().ctx, &cta.main); }

inline void wait(Barrier& b) {
  ++cta.progress;
  const unsigned generation = b.generation;
  if (++b.arrived == b.size) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation) yield();
}

// A warp collective: this lane's words go in, every lane's words of the same collective come out
// ([32][kSlotWords], valid until the warp's next collective).
inline const uint32_t* exchange(const uint32_t* words, int n) {
  const int t = linear_tid(), warp = t / kWarp, lane = t % kWarp;
  if (n > kSlotWords) fail("exchange: too many words");
  Fiber& f = me();
  const size_t n_warps = cta.warps.size();
  uint32_t* base = cta.slots.data() + ((f.collectives++ & 1) * n_warps + warp) * kWarp * kSlotWords;
  std::memcpy(base + lane * kSlotWords, words, n * sizeof(uint32_t));
  wait(cta.warps[warp]);
  return base;
}

inline int lane_id() { return linear_tid() % kWarp; }

inline void syncthreads() { wait(cta.block); }

inline void fiber_main() {
  cta.body();
  me().done = true;
}

inline void run_cta(int threads, size_t smem_bytes) {
  if (threads % kWarp) fail("blockDim must be a multiple of 32 here");
  cta.fibers.resize(threads);
  cta.block = Barrier{threads};
  cta.warps.assign(threads / kWarp, Barrier{kWarp});
  cta.slots.assign(2 * threads * kSlotWords, 0);
  cta.dynamic_smem.assign(smem_bytes, 0xff);  // NaN in every 16-bit float format
  for (int i = 0; i < threads; ++i) {
    Fiber& f = cta.fibers[i];
    f.done = false;
    f.collectives = 0;
    f.committed.clear();
    f.open.clear();
    f.tid = uint3{i % blockDim.x, i / blockDim.x % blockDim.y, i / (blockDim.x * blockDim.y)};
    f.stack.resize(kStackBytes);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &cta.main;
    makecontext(&f.ctx, fiber_main, 0);
  }
  std::vector<int> order(threads);
  constexpr uint64_t kSkewWindow = 12;  // every warp of a skewed schedule runs within 12 rounds
  uint64_t window_progress = 0;
  int window_finished = 0;
  uint64_t round = 0, seed = 0x9e3779b97f4a7c15ull ^ (blockIdx.x * 131u + blockIdx.y * 7u + blockIdx.z);
  for (int left = threads; left > 0; ++round) {
    for (int i = 0; i < threads; ++i) order[i] = (i + static_cast<int>(round)) % threads;
    if (config.schedule == 1) std::reverse(order.begin(), order.end());
    if (config.schedule == 2) {
      for (int i = threads - 1; i > 0; --i) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        std::swap(order[i], order[(seed >> 33) % (i + 1)]);
      }
    }
    // A window of rounds in which every fiber ran at least once must make progress, else no one ever will.
    const bool skewed = config.schedule == 3;
    if (round % kSkewWindow == 0 || !skewed) {
      if (round > 0 && window_finished == 0 && cta.progress == window_progress)
        fail("deadlock: a barrier or warp collective some threads never reach");
      window_finished = 0;
      window_progress = cta.progress;
    }
    for (const int i : order) {
      Fiber& f = cta.fibers[i];
      if (f.done || (skewed && round % (i / kWarp % 4 + 1) != 0)) continue;
      cta.current = i;
      threadIdx = f.tid;
      swapcontext(&cta.main, &f.ctx);
      window_finished += f.done;
      left -= f.done;
    }
  }
  cta.current = -1;
}

// kernel<<<grid, block, smem, stream>>>(args...) becomes Launch(grid, block, smem, stream)(kernel, args...):
// the CTAs run one after another, in order.
struct Launch {
  dim3 grid, block;
  size_t smem;
  Launch(dim3 g, dim3 b, size_t s = 0, const void* = nullptr) : grid(g), block(b), smem(s) {}
  template <class... P, class... A>
  void operator()(void (*kernel)(P...), A&&... args) const {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
      fail("launch: a grid dimension out of range (x < 2^31, y and z <= 65535, none 0)");
    if (block.x * block.y * block.z > 1024 || block.z > 64) fail("launch: more than 1024 threads per block");
    const auto opt_in = smem_opt_in.find(reinterpret_cast<const void*>(kernel));
    if (smem > (opt_in == smem_opt_in.end() ? kDefaultSmemBytes : opt_in->second))
      fail("launch: dynamic shared memory above the kernel's limit (cudaFuncSetAttribute)");
    gridDim = grid;
    blockDim = block;
    const std::function<void()> body = [&] { kernel(args...); };
    cta.body = body;
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = uint3{x, y, z};
          run_cta(static_cast<int>(block.x * block.y * block.z), smem);
        }
    cta.body = nullptr;
  }
};

// cp.async bookkeeping, per fiber.
inline void async_copy(void* dst, const void* src, int bytes, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes || (src_bytes && reinterpret_cast<uintptr_t>(src) % bytes))
    fail("cp.async: misaligned address");
  const Copy c{static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), bytes, src_bytes};
  if (config.copies_at_issue) {
    c.run();
  } else {
    me().open.push_back(c);
  }
}
inline void async_commit() {
  Fiber& f = me();
  f.committed.push_back(std::move(f.open));
  f.open.clear();
}
inline void async_wait(size_t pending) {
  Fiber& f = me();
  while (f.committed.size() > pending) {
    for (const Copy& c : f.committed.front()) c.run();
    f.committed.erase(f.committed.begin());
  }
}
inline void async_wait_all() {
  async_commit();
  async_wait(0);
}

}  // namespace dllm_emu

inline void __syncthreads() { dllm_emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  const uint32_t none = 0;
  dllm_emu::exchange(&none, 1);
}

template <class T>
T shuffle(unsigned mask, T v, int (*source)(int lane, int arg), int arg) {
  static_assert(sizeof(T) <= 8);
  if (mask != 0xffffffffu) dllm_emu::fail("shuffle: partial masks are not emulated");
  uint32_t words[2] = {0, 0};
  std::memcpy(words, &v, sizeof(T));
  const uint32_t* all = dllm_emu::exchange(words, 2);
  const int src = source(dllm_emu::lane_id(), arg);
  T out;
  std::memcpy(&out, all + (src >= 0 && src < 32 ? src : dllm_emu::lane_id()) * dllm_emu::kSlotWords, sizeof(T));
  return out;
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int = 32) {
  return shuffle<T>(mask, v, [](int l, int a) { return l ^ a; }, lane_mask);
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int = 32) {
  return shuffle<T>(mask, v, [](int, int a) { return a; }, src);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int = 32) {
  return shuffle<T>(mask, v, [](int l, int a) { return l + a; }, static_cast<int>(delta));
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int = 32) {
  return shuffle<T>(mask, v, [](int l, int a) { return l - a; }, static_cast<int>(delta));
}

// redux.sync (sm_80): every lane gets the warp's sum / min / max.
namespace dllm_emu {
template <class T, class Op>
T redux(unsigned mask, T v, Op op) {
  static_assert(sizeof(T) == 4);
  if (mask != 0xffffffffu) fail("redux: partial masks are not emulated");
  uint32_t word;
  std::memcpy(&word, &v, 4);
  const uint32_t* all = exchange(&word, 1);
  T out;
  std::memcpy(&out, all, 4);
  for (int l = 1; l < 32; ++l) {
    T other;
    std::memcpy(&other, all + l * kSlotWords, 4);
    out = op(out, other);
  }
  return out;
}
}  // namespace dllm_emu
template <class T>
T __reduce_add_sync(unsigned mask, T v) {
  return dllm_emu::redux(mask, v, [](T a, T b) { return static_cast<T>(a + b); });
}
template <class T>
T __reduce_min_sync(unsigned mask, T v) {
  return dllm_emu::redux(mask, v, [](T a, T b) { return a < b ? a : b; });
}
template <class T>
T __reduce_max_sync(unsigned mask, T v) {
  return dllm_emu::redux(mask, v, [](T a, T b) { return a > b ? a : b; });
}

// The fibers of a CTA never run at once, so a plain read-modify-write is atomic.
template <class T>
T atomicAdd(T* address, T v) {
  const T old = *address;
  *address = old + v;
  return old;
}

inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }

template <class T>
inline T __ldg(const T* p) {
  return *p;
}

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __int_as_float(int i) { return __uint_as_float(static_cast<uint32_t>(i)); }
inline int __float_as_int(float f) { return static_cast<int>(__float_as_uint(f)); }

inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  const uint64_t bytes = uint64_t{y} << 32 | x;
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) r |= static_cast<uint32_t>(bytes >> (8 * ((s >> (4 * n)) & 7)) & 0xff) << (8 * n);
  return r;
}

// 16-bit floats as their bits; conversions round to nearest even as the hardware's _rn forms do.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline __half __ushort_as_half(uint16_t b) { return {b}; }
inline uint16_t __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  const uint32_t u = __float_as_uint(x);
  if (std::isnan(x)) return {static_cast<uint16_t>((u >> 16) | 0x40)};
  return {static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(uint32_t{b.bits} << 16); }
