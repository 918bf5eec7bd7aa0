// Stable counting sort of small integer keys per row, for LSH attention (Reformer): the keys are the
// offset bucket ids of all hash rounds of one (batch, head), key = round * num_buckets_total +
// bucket, so num_keys = num_hashes * (num_buckets + 1) is at most a few thousand while a row holds
// num_hashes * seq elements (up to 512k). For every row:
//
//   sorted_idx[r, i] = the element at rank i of the stable sort of keys[r, :] (int64 [rows, n])
//   undo_idx[r, sorted_idx[r, i]] = i                                        (int64 [rows, n])
//
// exactly torch.argsort(keys, dim=1, stable=True) and its inverse permutation. The inverse is
// optional (with_undo = false: an empty undo_idx, nothing written): LSH attention only needs
// sorted_idx (its unsort goes through the positions, kernels/lsh_attention.py), and the undo writes
// are 8 of the ~48 bytes per element of int64 keys, scattered ones at that. Keys outside
// [0, num_keys) must not occur; if they do, they are treated as one extra key num_keys (sorted after
// every valid key, stably), so the kernels never index out of bounds (a host-side range check would
// need a device synchronisation; the Python wrapper offers it as an option).
//
// Why segments scanned by one warp each (the stability argument). A stable parallel counting sort
// must give every element the position start[key] + (number of equal keys before it in the row).
// The row is cut into P contiguous segments, each owned by one warp that walks its segment in order,
// 32 elements at a time:
//   1. hist_kernel    grid (P, rows): counts[r, k, p] = occurrences of key k in segment p
//                     (shared-memory atomics; order does not matter for a count). Key-major layout.
//   2. scan_kernel    grid (rows): exclusive prefix sum over counts[r] flattened in (key, segment)
//                     order. Then offsets[r, k, p] = #(keys < k in the row) + #(key k in segments
//                     before p): the first output slot of segment p's elements of key k.
//   3. scatter_kernel grid (P, rows), one warp per block: cursor[k] = offsets[r, k, p] in shared
//                     memory. For each group of 32 consecutive elements, __match_any_sync finds the
//                     lanes holding the same key; a lane's position is cursor[key] + (number of such
//                     lanes below it), then the highest lane of each group advances cursor[key].
//                     Segments before p, earlier groups of p and lower lanes of the group are exactly
//                     the equal keys before an element, so the order is stable by construction.
// Alternatives rejected: one block per row with many warps needs either per-warp histograms
// (warps x num_keys shared memory) or serialising the warps of every tile (a barrier per warp),
// and fills only `rows` SMs (8 for batch 1 x 8 heads); unstable shared-memory atomics in the scatter
// would need a second sort inside every bucket. The cost of the chosen scheme is the counts array
// (rows x (num_keys + 1) x P int32); the host caps P so that it stays at most n entries per row.
//
// Traffic per row (e = key bytes): read keys twice (n e each), write sorted_idx and undo_idx (16 n),
// plus 4 x 4 (num_keys + 1) P <= 16 n bytes for the counts (written, scanned, read): at most
// 2 e n + 32 n bytes, 48 n for int64 keys; without undo_idx 2 e n + 24 n, 40 n.
//
// References: counting sort with per-partition histograms (Zagha & Blelloch, "Radix sort for vector
// multiprocessors", SC 1991); CUDA programming guide, __match_any_sync / warp vote functions.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common.cuh"
#include "ops.h"

namespace pefops {
namespace {

constexpr const char* kOpName = "lsh_counting_sort";
constexpr int kHistThreads = 256;
constexpr int kScanThreads = 1024;
constexpr int kMinSegment = 1024;     // elements per segment at least (32 warp steps)
constexpr int kWarpsPerSmTarget = 32;  // scatter warps wanted per SM (latency hiding)
constexpr int kBatch = 8;  // warp steps of the scatter whose keys are loaded together
constexpr int kScanChunk = 16;  // counts read per thread at once by the scan

// The key of one element as a bin in [0, num_keys]; out-of-range keys go to the extra bin num_keys.
template <typename K>
__device__ __forceinline__ int bin_of(K key, int num_keys) {
  return (key >= 0 && key < static_cast<K>(num_keys)) ? static_cast<int>(key) : num_keys;
}

// counts[r, k, p] (int32 [rows, num_keys + 1, P]) = occurrences of bin k in segment p of row r.
template <typename K>
__global__ void hist_kernel(const K* __restrict__ keys,  // [rows, n]
                            int32_t* __restrict__ counts,  // [rows, num_keys + 1, P]
                            int64_t n, int num_keys, int64_t seg_len, int P) {
  extern __shared__ int32_t hist[];  // [num_keys + 1]
  const int p = blockIdx.x;
  const int64_t r = blockIdx.y;
  const int bins = num_keys + 1;
  for (int k = threadIdx.x; k < bins; k += blockDim.x) hist[k] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(p) * seg_len;
  const int64_t end = min(n, begin + seg_len);
  const K* row = keys + r * n;
#pragma unroll 8  // several independent key loads in flight before their atomics wait on them
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    atomicAdd(&hist[bin_of(row[i], num_keys)], 1);
  }
  __syncthreads();
  int32_t* out = counts + r * static_cast<int64_t>(bins) * P;
  for (int k = threadIdx.x; k < bins; k += blockDim.x) out[static_cast<int64_t>(k) * P + p] = hist[k];
}

// In-place exclusive prefix sum of each row of counts (int32 [rows, m]); one block per row. Thread t
// owns the contiguous run [t * run, (t + 1) * run): it sums the run, the block scans the thread sums,
// and the thread rewrites its run with the running prefix. Totals fit int32 (they are <= n < 2^31).
__global__ void scan_kernel(int32_t* __restrict__ counts,  // [rows, m]
                            int64_t m) {
  __shared__ int32_t warp_sums[32];
  int32_t* row = counts + static_cast<int64_t>(blockIdx.x) * m;
  const int64_t run = (m + blockDim.x - 1) / blockDim.x;
  const int64_t begin = min(m, static_cast<int64_t>(threadIdx.x) * run);
  const int64_t end = min(m, begin + run);
  // Runs are read kScanChunk entries at a time, loads first: one memory latency per chunk, not
  // per entry (a load-add loop would wait for every load in turn).
  int32_t sum = 0;
  for (int64_t c = begin; c < end; c += kScanChunk) {
    int32_t v[kScanChunk];
#pragma unroll
    for (int j = 0; j < kScanChunk; ++j) v[j] = c + j < end ? row[c + j] : 0;
#pragma unroll
    for (int j = 0; j < kScanChunk; ++j) sum += v[j];
  }

  // Block exclusive scan of the per-thread sums: inclusive warp scan, then a scan of warp totals.
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int32_t inclusive = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t up = __shfl_up_sync(kFullMask, inclusive, o);
    if (lane >= o) inclusive += up;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x >> 5;
    int32_t w = lane < nwarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t up = __shfl_up_sync(kFullMask, w, o);
      if (lane >= o) w += up;
    }
    warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  int32_t prefix = inclusive - sum + (warp > 0 ? warp_sums[warp - 1] : 0);
  for (int64_t c = begin; c < end; c += kScanChunk) {
    int32_t v[kScanChunk];
#pragma unroll
    for (int j = 0; j < kScanChunk; ++j) v[j] = c + j < end ? row[c + j] : 0;
#pragma unroll
    for (int j = 0; j < kScanChunk; ++j) {
      if (c + j < end) row[c + j] = prefix;
      prefix += v[j];
    }
  }
}

// The raw keys of kBatch consecutive warp steps starting at element base (the lane's elements
// base + lane, base + 32 + lane, ...); -1 past the segment end. Raw, not yet binned: the first use
// of a loaded register is then in the next batch, so nothing waits for these loads now.
template <typename K>
__device__ __forceinline__ void load_batch(const K* __restrict__ row, int64_t base, int64_t end,
                                           int lane, K (&keys)[kBatch]) {
#pragma unroll
  for (int u = 0; u < kBatch; ++u) {
    const int64_t i = base + 32 * u + lane;
    keys[u] = i < end ? row[i] : K(-1);
  }
}

// One warp per (segment p, row r): the stable scatter described at the top of the file.
template <typename K>
__global__ void __launch_bounds__(32) scatter_kernel(
    const K* __restrict__ keys,           // [rows, n]
    const int32_t* __restrict__ offsets,  // [rows, num_keys + 1, P] exclusive prefix sums
    int64_t* __restrict__ sorted_idx,     // [rows, n]
    int64_t* __restrict__ undo_idx,       // [rows, n], or nullptr: not wanted
    int64_t n, int num_keys, int64_t seg_len, int P) {
  extern __shared__ int32_t cursor[];  // [num_keys + 1]: next free slot per key for this segment
  const int p = blockIdx.x;
  const int64_t r = blockIdx.y;
  const int lane = threadIdx.x;
  const int bins = num_keys + 1;
  const int32_t* off = offsets + r * static_cast<int64_t>(bins) * P;
  // strided (key-major) loads, unrolled so that 16 are in flight at once
#pragma unroll 16
  for (int k = lane; k < bins; k += 32) cursor[k] = off[static_cast<int64_t>(k) * P + p];
  __syncwarp();

  const int64_t begin = static_cast<int64_t>(p) * seg_len;
  const int64_t end = min(n, begin + seg_len);
  const K* row = keys + r * n;
  int64_t* sorted_row = sorted_idx + r * n;
  int64_t* undo_row = undo_idx != nullptr ? undo_idx + r * n : nullptr;  // warp-uniform test below
  const unsigned lower_lanes = (1u << lane) - 1u;  // lanes below this one

  // Keys are loaded kBatch warp steps at a time (lane l of step u reads element base + 32 u + l,
  // coalesced) and one batch ahead, so a batch's global-memory latency overlaps the processing of
  // the previous one; a single step's work is much shorter than that latency.
  K next[kBatch];
  load_batch(row, begin, end, lane, next);
  for (int64_t base = begin; base < end; base += 32 * kBatch) {
    K current[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) current[u] = next[u];
    load_batch(row, base + 32 * kBatch, end, lane, next);
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t step = base + 32 * u;
      if (step >= end) break;  // warp-uniform
      const int64_t i = step + lane;
      const bool valid = i < end;
      // -1 past the segment end: those lanes form their own group and touch no cursor
      const int bin = valid ? bin_of(current[u], num_keys) : -1;
      const unsigned peers = __match_any_sync(kFullMask, bin);
      const int rank = __popc(peers & lower_lanes);
      int32_t pos = 0;
      if (valid) pos = cursor[bin] + rank;
      __syncwarp();  // every lane has read its cursor before any is advanced
      const bool last_of_group = (peers >> lane) == 1u;  // highest lane holding this key
      if (valid && last_of_group) cursor[bin] = pos + 1;
      __syncwarp();
      if (valid) {
        sorted_row[pos] = i;
        if (undo_row != nullptr) undo_row[i] = pos;
      }
    }
  }
}

// Number of segments per row: enough warps to fill the GPU, segments of at least kMinSegment
// elements, and a counts array of at most n entries per row ((num_keys + 1) * P <= n).
// Keep in step with tests/csrc/test_lsh_sort_emulation.py.
int64_t choose_segments(int64_t rows, int64_t n, int64_t num_keys, int64_t sm_count) {
  const int64_t want = std::max<int64_t>(1, (kWarpsPerSmTarget * sm_count + rows - 1) / rows);
  const int64_t by_length = std::max<int64_t>(1, n / kMinSegment);
  const int64_t by_counts = std::max<int64_t>(1, n / (num_keys + 1));
  return std::max<int64_t>(1, std::min({want, by_length, by_counts, int64_t{65535}}));
}

template <typename K>
void run_sort(const at::Tensor& keys, int64_t num_keys, at::Tensor& sorted_idx,
              at::Tensor& undo_idx) {
  const int64_t rows = keys.size(0);
  const int64_t n = keys.size(1);
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int bins = static_cast<int>(num_keys) + 1;
  const size_t smem = static_cast<size_t>(bins) * sizeof(int32_t);
  TORCH_CHECK(smem <= prop->sharedMemPerBlockOptin, kOpName, ": num_keys = ", num_keys,
              " needs ", smem, " bytes of shared memory per block, this GPU allows ",
              prop->sharedMemPerBlockOptin, " (sort with torch.argsort instead)");
  if (smem > 48 * 1024) {  // above the default limit: opt in (per kernel, cheap to repeat)
    C10_CUDA_CHECK(cudaFuncSetAttribute(hist_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    C10_CUDA_CHECK(cudaFuncSetAttribute(scatter_kernel<K>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }

  const int64_t P = choose_segments(rows, n, num_keys, prop->multiProcessorCount);
  const int64_t seg_len = (n + P - 1) / P;
  const int64_t m = static_cast<int64_t>(bins) * P;
  at::Tensor counts = at::empty({rows, m}, keys.options().dtype(at::kInt));
  int32_t* cp = counts.data_ptr<int32_t>();
  const K* kp = keys.data_ptr<K>();

  const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(rows));
  hist_kernel<K><<<grid, kHistThreads, smem, stream>>>(kp, cp, n, static_cast<int>(num_keys),
                                                       seg_len, static_cast<int>(P));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  scan_kernel<<<static_cast<unsigned>(rows), kScanThreads, 0, stream>>>(cp, m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  int64_t* undo = undo_idx.numel() > 0 ? undo_idx.data_ptr<int64_t>() : nullptr;
  scatter_kernel<K><<<grid, 32, smem, stream>>>(kp, cp, sorted_idx.data_ptr<int64_t>(), undo, n,
                                                static_cast<int>(num_keys), seg_len,
                                                static_cast<int>(P));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lsh_counting_sort(const at::Tensor& keys, int64_t num_keys,
                                                     bool with_undo) {
  // Device last: the other host checks then run on CPU tensors too (tests without a GPU).
  TORCH_CHECK(keys.defined(), kOpName, ": keys is undefined");
  const auto dt = keys.scalar_type();
  TORCH_CHECK(dt == at::kLong || dt == at::kInt, kOpName, ": keys has dtype ", dt,
              ", expected int64 or int32");
  TORCH_CHECK(keys.dim() == 2, kOpName, ": keys must be 2-D [rows, n], got ", keys.dim(),
              " dimensions (flatten the leading dimensions first)");
  TORCH_CHECK(keys.is_contiguous(), kOpName, ": keys must be contiguous (call .contiguous())");
  TORCH_CHECK(num_keys >= 1 && num_keys < std::numeric_limits<int32_t>::max(), kOpName,
              ": num_keys must be >= 1 (all keys lie in [0, num_keys)), got ", num_keys);
  TORCH_CHECK(keys.is_cuda(), kOpName, ": keys must be a CUDA tensor, got a tensor on ",
              keys.device());
  const int64_t rows = keys.size(0);
  const int64_t n = keys.size(1);
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), kOpName, ": rows of ", n,
              " elements are too long (at most 2^31 - 2)");
  TORCH_CHECK(rows <= 65535, kOpName, ": at most 65535 rows (grid y), got ", rows);

  const c10::cuda::CUDAGuard guard(keys.device());
  at::Tensor sorted_idx = at::empty({rows, n}, keys.options().dtype(at::kLong));
  // without the inverse: an empty tensor, and the scatter writes none (run_sort passes nullptr)
  at::Tensor undo_idx = with_undo ? at::empty({rows, n}, keys.options().dtype(at::kLong))
                                  : at::empty({0}, keys.options().dtype(at::kLong));
  if (rows == 0 || n == 0) return {sorted_idx, undo_idx};
  if (dt == at::kLong) {
    run_sort<int64_t>(keys, num_keys, sorted_idx, undo_idx);
  } else {
    run_sort<int32_t>(keys, num_keys, sorted_idx, undo_idx);
  }
  return {sorted_idx, undo_idx};
}

}  // namespace pefops
