// A chain of dependent GEMVs (y_{l+1} = W_l y_l, fp16 weights and activations, fp32 sums) in ONE persistent
// launch, each block's weights streamed ahead of the activations they meet: the question bench/stream_ahead.py
// asks before anyone writes a decode megakernel (issue 18). Weights never depend on the token, so nothing stops
// a block from copying layer l+1's rows into shared memory while layer l's input is still being computed
// elsewhere; only the activations carry the chain, through one counter a layer in global memory.
//
// Block b owns rows b·ROWS … b·ROWS + ROWS − 1 of every layer (gridDim.x · ROWS = hidden). Warp 0 is the
// producer: one lane walks (layer, column chunk) in order and bulk-copies the block's ROWS × KC tile of each into
// a ring of STAGES shared-memory slots (cp.async.bulk, completing on the slot's `full` mbarrier), waiting only for
// a slot to be handed back (`empty`). Warps 1 … CONSUMERS wait for layer l's input (ready[l] == gridDim.x), then
// for each chunk read their x columns from L2, wait for the tile, add up their rows, hand the slot back; at the
// layer's end they write their rows of y_{l+1} and the block counts itself into ready[l + 1].
//
// Every block must be resident at once (they wait on each other): the launcher checks the occupancy.
// Built by bench/stream_ahead.py with nvcc for sm_90a and called through ctypes (no PyTorch headers needed).

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mbarrier.cuh"

namespace {

// Block 0's first consumer thread writes the GPU's timer at each stage boundary of each layer (stamps may be null):
// where a layer's time goes inside the persistent launch, as bench/stream_ahead.py prints it.
__device__ __forceinline__ void stamp(long long* stamps, int index, int thread) {
    if (stamps != nullptr && blockIdx.x == 0 && thread == 0) {
        long long now;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        stamps[index] = now;
    }
}

__device__ __forceinline__ int load_acquire(const int* pointer) {
    int value;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(value) : "l"(pointer) : "memory");
    return value;
}

__device__ __forceinline__ void consumers_sync() {  // the four consumer warps only (named barrier 1)
    asm volatile("bar.sync 1, 128;" ::: "memory");
}

// Every block counted into `counter` (one consumer thread polls, the others wait at the barrier), so what they
// wrote before counting themselves is visible.
__device__ __forceinline__ void await_blocks(const int* counter, int thread) {
    if (thread == 0)
        while (load_acquire(counter) < (int)gridDim.x) {
        }
    consumers_sync();
}

// This block's writes visible GPU-wide, then the block counts itself into `counter`.
__device__ __forceinline__ void publish(int* counter, int thread) {
    __threadfence();
    consumers_sync();
    if (thread == 0) atomicAdd(counter, 1);
}

// The ring's mbarriers: `full` completes when a slot's bulk copies land, `empty` when every consumer warp is done.
template <int STAGES, int CONSUMERS>
__device__ __forceinline__ void init_ring(uint64_t* full, uint64_t* empty) {
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            barrier_init(&full[s], 1);
            barrier_init(&empty[s], CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
}

// The producer (one lane): rows first_row … first_row + ROWS − 1 of every layer of `weights` (layers ×
// layer_rows × hidden), chunk by chunk, into the ring, as far ahead as the consumers hand slots back.
template <int ROWS, int KC, int STAGES>
__device__ __forceinline__ void stream_rows(const __half* weights, int layer_rows, int first_row, int layers,
                                            int hidden, __half* tiles, uint64_t* full, uint64_t* empty) {
    constexpr uint32_t TILE_BYTES = ROWS * KC * sizeof(__half);
    int step = 0;
    for (int layer = 0; layer < layers; ++layer) {
        for (int chunk = 0; chunk < hidden / KC; ++chunk, ++step) {
            const int slot = step % STAGES;
            barrier_wait(&empty[slot], ((step / STAGES) & 1) ^ 1);
            barrier_expect_bytes(&full[slot], TILE_BYTES);
            const __half* source = weights + ((size_t)layer * layer_rows + first_row) * hidden + (size_t)chunk * KC;
            for (int row = 0; row < ROWS; ++row)
                bulk_copy(tiles + (slot * ROWS + row) * KC, source + (size_t)row * hidden, KC * sizeof(__half),
                          &full[slot]);
        }
    }
}

// One layer's rows from the ring (consumer warp `consumer` takes rows consumer, consumer + CONSUMERS, …): each
// row's dot product with x (read from L2: other blocks wrote it), rounded to fp16 into out[row]. `step` counts
// the ring's slots across layers, as the producer does.
template <int ROWS, int KC, int STAGES, int CONSUMERS>
__device__ __forceinline__ void ring_rows(const __half* x, __half* out, int hidden, const __half* tiles,
                                          uint64_t* full, uint64_t* empty, int& step) {
    static_assert(KC % 256 == 0, "a lane takes KC / 32 columns, in 16-byte vectors");
    constexpr int ROWS_PER_WARP = (ROWS + CONSUMERS - 1) / CONSUMERS;
    constexpr int PER_LANE = KC / 32;
    constexpr int VECTORS = PER_LANE / 8;
    const int consumer = threadIdx.x / 32 - 1, lane = threadIdx.x % 32;
    float sums[ROWS_PER_WARP];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) sums[r] = 0.0f;
    for (int chunk = 0; chunk < hidden / KC; ++chunk, ++step) {
        const int slot = step % STAGES;
        // vector v of lane l is columns (v·32 + l)·8 …: a warp's 16-byte accesses are contiguous, free of bank
        // conflicts in the tile
        float xs[PER_LANE];
        const uint4* x_vectors = reinterpret_cast<const uint4*>(x + chunk * KC) + lane;
#pragma unroll
        for (int v = 0; v < VECTORS; ++v) {
            const uint4 packed = __ldcg(x_vectors + v * 32);
            const __half* halves = reinterpret_cast<const __half*>(&packed);
#pragma unroll
            for (int e = 0; e < 8; ++e) xs[v * 8 + e] = __half2float(halves[e]);
        }
        barrier_wait(&full[slot], (step / STAGES) & 1);
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; ++r) {
            const int row = consumer + r * CONSUMERS;
            if (row < ROWS) {
                const uint4* w_vectors = reinterpret_cast<const uint4*>(tiles + (slot * ROWS + row) * KC) + lane;
#pragma unroll
                for (int v = 0; v < VECTORS; ++v) {
                    const uint4 packed = w_vectors[v * 32];
                    const __half* halves = reinterpret_cast<const __half*>(&packed);
#pragma unroll
                    for (int e = 0; e < 8; ++e) sums[r] += __half2float(halves[e]) * xs[v * 8 + e];
                }
            }
        }
        __syncwarp();
        if (lane == 0) barrier_arrive(&empty[slot]);
    }
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        const int row = consumer + r * CONSUMERS;
        float total = sums[r];
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
        if (lane == 0 && row < ROWS) out[row] = __float2half(total);
    }
}

template <int ROWS, int KC, int STAGES, int CONSUMERS>
__global__ void __launch_bounds__((CONSUMERS + 1) * 32, 1)
    chain_kernel(const __half* __restrict__ weights, __half* ys, int* ready, int layers, int hidden,
                 long long* stamps) {
    static_assert(CONSUMERS == 4, "consumers_sync is a barrier of four warps");
    extern __shared__ __align__(128) unsigned char shared[];
    __half* tiles = reinterpret_cast<__half*>(shared);  // STAGES × ROWS × KC
    uint64_t* full = reinterpret_cast<uint64_t*>(shared + STAGES * ROWS * KC * sizeof(__half));
    uint64_t* empty = full + STAGES;
    const int first_row = blockIdx.x * ROWS;
    init_ring<STAGES, CONSUMERS>(full, empty);
    if (threadIdx.x < 32) {  // the producer: as far ahead as the ring allows, whatever the activations are doing
        if (threadIdx.x == 0)
            stream_rows<ROWS, KC, STAGES>(weights, hidden, first_row, layers, hidden, tiles, full, empty);
        return;
    }
    const int thread = threadIdx.x - 32;
    int step = 0;
    for (int layer = 0; layer < layers; ++layer) {
        stamp(stamps, layer * 3, thread);
        if (layer > 0) await_blocks(&ready[layer], thread);  // every block's rows of this layer's input
        stamp(stamps, layer * 3 + 1, thread);
        ring_rows<ROWS, KC, STAGES, CONSUMERS>(ys + (size_t)layer * hidden,
                                               ys + (size_t)(layer + 1) * hidden + first_row, hidden, tiles, full,
                                               empty, step);
        publish(&ready[layer + 1], thread);
        stamp(stamps, layer * 3 + 2, thread);
    }
}

// The same chain with RaNA's rank adapter as the product: z = B_l y_l (B: rank × hidden, streamed ahead as above),
// then y_{l+1} = Σ_{|z_k| ≥ τ_l} z_k A_l[k, :] (A_l: rank × hidden, a row per rank, read only where active). Block
// b owns RB ranks of B (its rows of z) and C columns of y. Per layer: its rows of z, published through ready[l];
// once every block's are in, each block lists the active ranks itself (a prefix sum over its 128 consumer threads,
// no compaction launch) and reads its C columns of their rows of A; y's columns published through ready[L + l + 1].
template <int RB, int C, int KC, int STAGES>
__global__ void __launch_bounds__(160, 1)
    masked_chain_kernel(const __half* __restrict__ b_weights, const __half* __restrict__ a_rows,
                        const float* __restrict__ thresholds, __half* ys, __half* zs, int* ready, int layers,
                        int hidden, int rank, long long* stamps) {
    constexpr int CONSUMERS = 4, THREADS = CONSUMERS * 32, UNROLL = 16;
    constexpr int GROUPS = C / 8;                 // 16-byte column groups of the block's columns
    constexpr int RANK_LANES = THREADS / GROUPS;  // threads on one column group, each taking its own ranks
    constexpr uint32_t TILE_BYTES = RB * KC * sizeof(__half);
    static_assert(C % 8 == 0 && THREADS % GROUPS == 0 && C <= THREADS, "columns in 16-byte groups");

    extern __shared__ __align__(128) unsigned char shared[];
    __half* tiles = reinterpret_cast<__half*>(shared);  // STAGES × RB × KC
    uint64_t* full = reinterpret_cast<uint64_t*>(shared + STAGES * TILE_BYTES);
    uint64_t* empty = full + STAGES;
    int* warp_counts = reinterpret_cast<int*>(empty + STAGES);  // CONSUMERS (+ padding)
    int* list_rank = warp_counts + 8;                            // rank entries
    float* list_coeff = reinterpret_cast<float*>(list_rank + rank);
    float* partial = list_coeff + rank;  // THREADS × 8 column sums

    const int lane = threadIdx.x % 32;
    const int first_rank = blockIdx.x * RB, first_column = blockIdx.x * C;
    init_ring<STAGES, CONSUMERS>(full, empty);
    if (threadIdx.x < 32) {  // the producer: this block's rows of every B_l, as far ahead as the ring allows
        if (threadIdx.x == 0)
            stream_rows<RB, KC, STAGES>(b_weights, rank, first_rank, layers, hidden, tiles, full, empty);
        return;
    }

    const int consumer = threadIdx.x / 32 - 1, thread = threadIdx.x - 32;
    int step = 0;
    for (int layer = 0; layer < layers; ++layer) {
        // 1. this block's ranks of z = B_l y_l, from the streamed tiles
        stamp(stamps, layer * 6, thread);
        if (layer > 0) await_blocks(&ready[layers + layer], thread);
        stamp(stamps, layer * 6 + 1, thread);
        ring_rows<RB, KC, STAGES, CONSUMERS>(ys + (size_t)layer * hidden, zs + (size_t)layer * rank + first_rank,
                                             hidden, tiles, full, empty, step);
        publish(&ready[layer], thread);
        stamp(stamps, layer * 6 + 2, thread);

        // 2. every block's z in: list this layer's active ranks (each thread a run of rank / THREADS of them)
        await_blocks(&ready[layer], thread);
        stamp(stamps, layer * 6 + 3, thread);
        const float threshold = thresholds[layer];
        const unsigned short* z = reinterpret_cast<const unsigned short*>(zs + (size_t)layer * rank);
        const int run = rank / THREADS, begin = thread * run;
        int count = 0;
        for (int i = 0; i < run; ++i)
            count += fabsf(__half2float(__ushort_as_half(__ldcg(z + begin + i)))) >= threshold;
        int inclusive = count;
#pragma unroll
        for (int offset = 1; offset < 32; offset *= 2) {
            const int before = __shfl_up_sync(0xffffffffu, inclusive, offset);
            if (lane >= offset) inclusive += before;
        }
        if (lane == 31) warp_counts[consumer] = inclusive;
        consumers_sync();
        int slot = inclusive - count, total = 0;
#pragma unroll
        for (int w = 0; w < CONSUMERS; ++w) {
            slot += w < consumer ? warp_counts[w] : 0;
            total += warp_counts[w];
        }
        for (int i = 0; i < run; ++i) {
            const float coefficient = __half2float(__ushort_as_half(__ldcg(z + begin + i)));
            if (fabsf(coefficient) >= threshold) {
                list_rank[slot] = begin + i;
                list_coeff[slot] = coefficient;
                ++slot;
            }
        }
        consumers_sync();
        stamp(stamps, layer * 6 + 4, thread);

        // 3. this block's C columns of the listed rows of A_l: UNROLL 16-byte loads in flight per thread
        const int group = thread % GROUPS, rank_lane = thread / GROUPS;
        const __half* base = a_rows + (size_t)layer * rank * hidden + first_column + group * 8;
        float column_sums[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) column_sums[e] = 0.0f;
        for (int i = rank_lane; i < total; i += RANK_LANES * UNROLL) {
            uint4 packed[UNROLL];
            float coefficient[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int entry = i + u * RANK_LANES;
                const bool listed = entry < total;
                packed[u] = listed ? __ldg(reinterpret_cast<const uint4*>(base + (size_t)list_rank[entry] * hidden))
                                   : make_uint4(0, 0, 0, 0);
                coefficient[u] = listed ? list_coeff[entry] : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const __half* halves = reinterpret_cast<const __half*>(&packed[u]);
#pragma unroll
                for (int e = 0; e < 8; ++e) column_sums[e] += coefficient[u] * __half2float(halves[e]);
            }
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) partial[thread * 8 + e] = column_sums[e];
        consumers_sync();
        if (thread < C) {  // column `thread`: its group's sums over every rank lane
            const int column_group = thread / 8, element = thread % 8;
            float sum = 0.0f;
            for (int q = 0; q < RANK_LANES; ++q) sum += partial[(q * GROUPS + column_group) * 8 + element];
            ys[(size_t)(layer + 1) * hidden + first_column + thread] = __float2half(sum);
        }
        publish(&ready[layers + layer + 1], thread);
        stamp(stamps, layer * 6 + 5, thread);
    }
}

template <int RB, int C, int KC, int STAGES>
int launch_masked(const __half* b_weights, const __half* a_rows, const float* thresholds, __half* ys, __half* zs,
                  int* ready, int layers, int hidden, int rank, long long* stamps, cudaStream_t stream) {
    const int blocks = hidden / C;
    if (hidden % C != 0 || hidden % KC != 0 || rank != blocks * RB || rank % 128 != 0) return 1;
    const size_t shared_bytes = STAGES * RB * KC * sizeof(__half) + 2 * STAGES * sizeof(uint64_t) +
                                8 * sizeof(int) + rank * (sizeof(int) + sizeof(float)) + 128 * 8 * sizeof(float);
    auto kernel = masked_chain_kernel<RB, C, KC, STAGES>;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared_bytes) != cudaSuccess)
        return 2;
    int device = 0, multiprocessors = 0, per_multiprocessor = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, kernel, 160, shared_bytes);
    if (blocks > multiprocessors * per_multiprocessor) return 3;
    if (cudaMemsetAsync(ready, 0, (2 * layers + 1) * sizeof(int), stream) != cudaSuccess) return 4;
    kernel<<<blocks, 160, shared_bytes, stream>>>(b_weights, a_rows, thresholds, ys, zs, ready, layers, hidden, rank,
                                                  stamps);
    return cudaGetLastError() == cudaSuccess ? 0 : 5;
}

template <int ROWS, int KC, int STAGES, int CONSUMERS>
int launch(const __half* weights, __half* ys, int* ready, int layers, int hidden, long long* stamps,
           cudaStream_t stream) {
    if (hidden % KC != 0 || hidden % ROWS != 0) return 1;
    const int blocks = hidden / ROWS;
    const size_t shared_bytes = STAGES * ROWS * KC * sizeof(__half) + 2 * STAGES * sizeof(uint64_t);
    auto kernel = chain_kernel<ROWS, KC, STAGES, CONSUMERS>;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared_bytes) != cudaSuccess)
        return 2;
    int device = 0, multiprocessors = 0, per_multiprocessor = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, kernel, (CONSUMERS + 1) * 32, shared_bytes);
    if (blocks > multiprocessors * per_multiprocessor) return 3;  // not all resident: the waits would deadlock
    if (cudaMemsetAsync(ready, 0, (layers + 1) * sizeof(int), stream) != cudaSuccess) return 4;
    kernel<<<blocks, (CONSUMERS + 1) * 32, shared_bytes, stream>>>(weights, ys, ready, layers, hidden, stamps);
    return cudaGetLastError() == cudaSuccess ? 0 : 5;
}

}  // namespace

// The shapes bench/stream_ahead.py times: 128 blocks (one a multiprocessor of an H100/H200), four consumer warps.
// 0 on success; 1 a hidden size the shape cannot tile, 2-5 a CUDA error (attribute, residency, memset, launch).
extern "C" int stream_ahead_chain(const void* weights, void* ys, int* ready, int layers, int hidden, int stages,
                                  long long* stamps,
                                  void* stream) {
    const __half* w = static_cast<const __half*>(weights);
    __half* y = static_cast<__half*>(ys);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (hidden == 4096 && stages == 4) return launch<32, 512, 4, 4>(w, y, ready, layers, hidden, stamps, s);
    if (hidden == 4096 && stages == 6) return launch<32, 512, 6, 4>(w, y, ready, layers, hidden, stamps, s);
    if (hidden == 2048 && stages == 4) return launch<16, 512, 4, 4>(w, y, ready, layers, hidden, stamps, s);
    if (hidden == 2048 && stages == 8) return launch<16, 512, 8, 4>(w, y, ready, layers, hidden, stamps, s);
    if (hidden == 512 && stages == 4) return launch<4, 256, 4, 4>(w, y, ready, layers, hidden, stamps, s);
    if (hidden == 512 && stages == 16) return launch<4, 256, 16, 4>(w, y, ready, layers, hidden, stamps, s);
    return 1;
}

// The masked chain at the shapes bench/stream_ahead.py times: hidden 4,096 with 3,072 ranks (128 blocks of 32
// columns and 24 ranks), hidden 512 with 384 ranks (64 blocks of 8 columns and 6 ranks). Codes as above.
extern "C" int stream_ahead_masked(const void* b_weights, const void* a_rows, const float* thresholds, void* ys,
                                   void* zs, int* ready, int layers, int hidden, int rank, long long* stamps,
                                   void* stream) {
    const __half* b = static_cast<const __half*>(b_weights);
    const __half* a = static_cast<const __half*>(a_rows);
    __half* y = static_cast<__half*>(ys);
    __half* z = static_cast<__half*>(zs);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (hidden == 4096 && rank == 3072)
        return launch_masked<24, 32, 512, 6>(b, a, thresholds, y, z, ready, layers, hidden, rank, stamps, s);
    if (hidden == 512 && rank == 384)
        return launch_masked<6, 8, 256, 8>(b, a, thresholds, y, z, ready, layers, hidden, rank, stamps, s);
    return 1;
}
