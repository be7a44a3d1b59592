// The products of a SmolLM2-shaped decoder layer, chained over every layer, in ONE thread-block cluster of a
// single persistent launch: the question bench/cluster_layer.py asks after bench/stream_ahead measured that a
// grid-wide hand-over through global memory costs ~2 µs on an H200, more than a PDL launch (issue 18).
//
// A cluster (8 or 16 blocks on one GPC) hands over through distributed shared memory instead: each block writes
// its rows of a product's output straight into every block's shared memory and arrives on every block's
// mbarrier (release at cluster scope); the next product starts when a block's own mbarrier completes. No global
// memory on the activations' path, no grid-wide counter. The price is bandwidth: 8-16 SMs, not 132, read the
// weights, so each block keeps a deep ring of bulk copies in flight (a producer warp, as in stream_ahead.cu) and
// can ask L2 for its rows of layer l + ahead while it works on layer l (bulk prefetches), so that the ring is
// filled from L2 rather than HBM.
//
// Per layer (hidden 576, q/k/v 960, intermediate 1,536; weights fp16, activations fp32 in shared memory):
//   a = RMSNorm(r)·w1;  qkv = W_qkv a;  o = W_o qkv[0:576] (attention's stand-in);  r += o;
//   a = RMSNorm(r)·w2;  [g; u] = W_gu a (rows interleaved g_j, u_j);  h = silu(g)·u;  r += W_down h.
// Each block keeps its own copy of r and makes the norms itself (no hand-over for them): 4 hand-overs a layer.
// Built by bench/cluster_layer.py with nvcc for sm_90a and called through ctypes.

#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mbarrier.cuh"

namespace cg = cooperative_groups;

namespace {

constexpr int HIDDEN = 576, QKV = 960, INTER = 1536;
constexpr int CONSUMERS = 8, THREADS = (CONSUMERS + 1) * 32;
constexpr int SLOT_BYTES = 24576;  // 16 rows of 576 or 8 rows of 1,536 (fp16)
constexpr int STAMPS = 9;          // per layer: start, after each product, after each hand-over

// Arrive on block `rank`'s copy of this barrier, releasing this thread's writes (and what it has seen) to the
// cluster: the hand-over.
__device__ __forceinline__ void barrier_arrive_remote(uint64_t* barrier, uint32_t rank) {
    uint32_t remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(shared_address(barrier)), "r"(rank));
    asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
}

__device__ __forceinline__ void prefetch_l2(const __half* source, uint32_t bytes) {  // in pieces of ≤ 32 KB
    const unsigned char* bytes_at = reinterpret_cast<const unsigned char*>(source);
    for (uint32_t done = 0; done < bytes; done += 32768)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(bytes_at + done), "r"(min(32768u, bytes - done))
                     : "memory");
}

__device__ __forceinline__ void consumers_sync() {  // the eight consumer warps only (named barrier 1)
    asm volatile("bar.sync 1, 256;" ::: "memory");
}

__device__ __forceinline__ void stamp(long long* stamps, int index, bool leader) {
    if (stamps != nullptr && leader) {
        long long now;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        stamps[index] = now;
    }
}

// The four products of a layer: their matrices, row length, and rows per ring slot.
struct Product {
    const __half* weights;  // layers × rows × K
    int rows, K, slot_rows;
};

struct Layer {
    Product p[4];
};

// The producer (one lane): this block's rows of every product of every layer, slot by slot, into the ring, as
// far ahead as the consumers hand slots back; with `ahead` > 0 it first asks L2 for its rows of layer + ahead.
template <int CLUSTER, int STAGES>
__device__ void produce(const Layer& layer_shape, int layers, int ahead, uint32_t rank, unsigned char* ring,
                        uint64_t* full, uint64_t* empty) {
    auto rows_of = [&](const Product& p, int layer) {
        const int mine = p.rows / CLUSTER;
        return p.weights + ((size_t)layer * p.rows + (size_t)rank * mine) * p.K;
    };
    for (int layer = 0; ahead > 0 && layer < ahead && layer < layers; ++layer)
        for (int q = 0; q < 4; ++q) {
            const Product& p = layer_shape.p[q];
            prefetch_l2(rows_of(p, layer), (p.rows / CLUSTER) * p.K * sizeof(__half));
        }
    int step = 0;
    for (int layer = 0; layer < layers; ++layer) {
        if (ahead > 0 && layer + ahead < layers)
            for (int q = 0; q < 4; ++q) {
                const Product& p = layer_shape.p[q];
                prefetch_l2(rows_of(p, layer + ahead), (p.rows / CLUSTER) * p.K * sizeof(__half));
            }
        for (int q = 0; q < 4; ++q) {
            const Product& p = layer_shape.p[q];
            const int mine = p.rows / CLUSTER;
            const __half* source = rows_of(p, layer);
            for (int first = 0; first < mine; first += p.slot_rows, ++step) {
                const int slot = step % STAGES, rows = min(p.slot_rows, mine - first);
                const uint32_t bytes = rows * p.K * sizeof(__half);
                barrier_wait(&empty[slot], ((step / STAGES) & 1) ^ 1);
                barrier_expect_bytes(&full[slot], bytes);
                bulk_copy(ring + slot * SLOT_BYTES, source + (size_t)first * p.K, bytes, &full[slot]);
            }
        }
    }
}

// This block's rows of one product: out[i] = row i · act (act: K floats in shared memory). Warp w takes rows
// w, w + 8, … of each slot; lane l columns (l + 32 v)·8 … of each row, its act values held in registers.
template <int K, int STAGES>
__device__ __forceinline__ void product(int mine, int slot_rows, const float* act, float* out,
                                        const unsigned char* ring, uint64_t* full, uint64_t* empty, int& step) {
    constexpr int VECTORS = K / 8, PER_LANE = (VECTORS + 31) / 32;
    const int warp = threadIdx.x / 32 - 1, lane = threadIdx.x % 32;
    float xs[PER_LANE][8];
#pragma unroll
    for (int v = 0; v < PER_LANE; ++v) {
        const int vector = lane + 32 * v;
#pragma unroll
        for (int e = 0; e < 8; ++e) xs[v][e] = vector < VECTORS ? act[vector * 8 + e] : 0.0f;
    }
    for (int first = 0; first < mine; first += slot_rows, ++step) {
        const int slot = step % STAGES, rows = min(slot_rows, mine - first);
        barrier_wait(&full[slot], (step / STAGES) & 1);
        for (int row = warp; row < rows; row += CONSUMERS) {
            const uint4* w = reinterpret_cast<const uint4*>(ring + slot * SLOT_BYTES + (size_t)row * K * 2);
            float sum = 0.0f;
#pragma unroll
            for (int v = 0; v < PER_LANE; ++v) {
                const int vector = lane + 32 * v;
                if (vector < VECTORS) {
                    const uint4 packed = w[vector];
                    const __half2* halves = reinterpret_cast<const __half2*>(&packed);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float2 pair = __half22float2(halves[e]);
                        sum += pair.x * xs[v][2 * e] + pair.y * xs[v][2 * e + 1];
                    }
                }
            }
#pragma unroll
            for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
            if (lane == 0) out[first + row] = sum;
        }
        __syncwarp();
        if (lane == 0) barrier_arrive(&empty[slot]);
    }
}

// act ← RMSNorm(r) · weight (every consumer thread; r and act in shared memory).
__device__ __forceinline__ void rmsnorm(const float* r, const __half* weight, float* act, float* scratch, int t) {
    float squares = 0.0f;
    for (int i = t; i < HIDDEN; i += CONSUMERS * 32) squares += r[i] * r[i];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) squares += __shfl_xor_sync(0xffffffffu, squares, offset);
    if (t % 32 == 0) scratch[t / 32] = squares;
    consumers_sync();
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < CONSUMERS; ++w) total += scratch[w];
    const float inv = rsqrtf(total / HIDDEN + 1e-5f);
    for (int i = t; i < HIDDEN; i += CONSUMERS * 32) act[i] = r[i] * inv * __half2float(weight[i]);
    consumers_sync();
}

// The hand-over: values[0 … count) into every block's `inbox` at offset, then arrive on every block's
// `handed` barrier; wait until every block has arrived on ours. `index` counts hand-overs (two barriers
// alternate, so a block running ahead cannot arrive on a phase another block is still completing).
template <int CLUSTER>
__device__ __forceinline__ void hand_over(const float* values, int count, int offset, float* inbox,
                                          uint64_t* handed, int index, int t) {
    cg::cluster_group cluster = cg::this_cluster();
    for (int k = t; k < count * CLUSTER; k += CONSUMERS * 32) {
        const int block = k / count, i = k % count;
        cluster.map_shared_rank(inbox, block)[offset + i] = values[i];
    }
    asm volatile("fence.acq_rel.cluster;" ::: "memory");
    consumers_sync();
    if (t < CLUSTER) barrier_arrive_remote(&handed[index % 2], t);
    barrier_wait<true>(&handed[index % 2], (index / 2) & 1);
}

template <int CLUSTER, int STAGES>
__global__ void __launch_bounds__(THREADS, 1)
    layer_chain_kernel(Layer shape, const __half* __restrict__ norm_weights, const __half* __restrict__ x0,
                       float* __restrict__ residuals, int layers, int ahead, int ring_only, long long* stamps) {
    extern __shared__ __align__(128) unsigned char shared[];
    unsigned char* ring = shared;
    uint64_t* full = reinterpret_cast<uint64_t*>(shared + STAGES * SLOT_BYTES);
    uint64_t* empty = full + STAGES;
    uint64_t* handed = empty + STAGES;                           // 2
    float* inbox = reinterpret_cast<float*>(handed + 2);         // 2 × INTER: what the other blocks hand over
    float* r = inbox + 2 * INTER;                                // HIDDEN: this block's copy of the residual
    float* act = r + HIDDEN;                                     // INTER: the product's input
    float* out = act + INTER;                                    // this block's rows of a product (and h)
    float* scratch = out + 3 * INTER / CLUSTER;                  // 32
    cg::cluster_group cluster = cg::this_cluster();
    const uint32_t rank = cluster.block_rank();
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            barrier_init(&full[s], 1);
            barrier_init(&empty[s], CONSUMERS);
        }
        barrier_init(&handed[0], CLUSTER);
        barrier_init(&handed[1], CLUSTER);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    cluster.sync();  // every block's barriers exist before anyone arrives on them
    if (threadIdx.x < 32) {
        if (threadIdx.x == 0) produce<CLUSTER, STAGES>(shape, layers, ahead, rank, ring, full, empty);
    } else {
        const int t = threadIdx.x - 32;
        const bool leader = rank == 0 && t == 0;
        if (ring_only) {  // the ring alone: every slot waited for and handed back, no sums, no hand-overs
            const int lane = t % 32;
            int slots = 0;
            for (int q = 0; q < 4; ++q) {
                const int mine = shape.p[q].rows / CLUSTER;
                slots += (mine + shape.p[q].slot_rows - 1) / shape.p[q].slot_rows;
            }
            for (int step = 0; step < layers * slots; ++step) {
                const int slot = step % STAGES;
                barrier_wait(&full[slot], (step / STAGES) & 1);
                __syncwarp();
                if (lane == 0) barrier_arrive(&empty[slot]);
            }
        } else {
            for (int i = t; i < HIDDEN; i += CONSUMERS * 32) r[i] = __half2float(x0[i]);
            consumers_sync();
            int step = 0, handovers = 0;
            const int qkv_rows = QKV / CLUSTER, o_rows = HIDDEN / CLUSTER, gu_rows = 2 * INTER / CLUSTER;
            for (int layer = 0; layer < layers; ++layer) {
                long long* s = stamps == nullptr ? nullptr : stamps + layer * STAMPS;
                stamp(s, 0, leader);
                rmsnorm(r, norm_weights + (size_t)(2 * layer) * HIDDEN, act, scratch, t);
                product<HIDDEN, STAGES>(qkv_rows, shape.p[0].slot_rows, act, out, ring, full, empty, step);
                consumers_sync();
                stamp(s, 1, leader);
                float* box = inbox + (handovers % 2) * INTER;
                hand_over<CLUSTER>(out, qkv_rows, rank * qkv_rows, box, handed, handovers++, t);
                stamp(s, 2, leader);
                for (int i = t; i < HIDDEN; i += CONSUMERS * 32) act[i] = box[i];  // q: attention's stand-in
                consumers_sync();
                product<HIDDEN, STAGES>(o_rows, shape.p[1].slot_rows, act, out, ring, full, empty, step);
                consumers_sync();
                stamp(s, 3, leader);
                box = inbox + (handovers % 2) * INTER;
                hand_over<CLUSTER>(out, o_rows, rank * o_rows, box, handed, handovers++, t);
                stamp(s, 4, leader);
                for (int i = t; i < HIDDEN; i += CONSUMERS * 32) r[i] += box[i];
                consumers_sync();
                rmsnorm(r, norm_weights + (size_t)(2 * layer + 1) * HIDDEN, act, scratch, t);
                product<HIDDEN, STAGES>(gu_rows, shape.p[2].slot_rows, act, out, ring, full, empty, step);
                consumers_sync();
                for (int j = t; j < gu_rows / 2; j += CONSUMERS * 32) {  // h_j = silu(g_j) · u_j, in place
                    const float g = out[2 * j], u = out[2 * j + 1];
                    out[gu_rows + j] = g / (1.0f + __expf(-g)) * u;
                }
                consumers_sync();
                stamp(s, 5, leader);
                box = inbox + (handovers % 2) * INTER;
                hand_over<CLUSTER>(out + gu_rows, gu_rows / 2, rank * (gu_rows / 2), box, handed, handovers++, t);
                stamp(s, 6, leader);
                for (int i = t; i < INTER; i += CONSUMERS * 32) act[i] = box[i];
                consumers_sync();
                product<INTER, STAGES>(o_rows, shape.p[3].slot_rows, act, out, ring, full, empty, step);
                consumers_sync();
                stamp(s, 7, leader);
                box = inbox + (handovers % 2) * INTER;
                hand_over<CLUSTER>(out, o_rows, rank * o_rows, box, handed, handovers++, t);
                stamp(s, 8, leader);
                for (int i = t; i < HIDDEN; i += CONSUMERS * 32) {
                    r[i] += box[i];
                    if (rank == 0) residuals[(size_t)layer * HIDDEN + i] = r[i];
                }
                consumers_sync();
            }
        }
    }
    // no block leaves while another may still write into its shared memory (the producer lane arrives late:
    // the non-aligned forms let its warp's other lanes wait without it)
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}

template <int CLUSTER, int STAGES>
int launch(const Layer& shape, const __half* norm_weights, const __half* x0, float* residuals, int layers,
           int ahead, int ring_only, long long* stamps, cudaStream_t stream) {
    const size_t shared_bytes = STAGES * SLOT_BYTES + (2 * STAGES + 2) * sizeof(uint64_t) +
                                (2 * INTER + HIDDEN + INTER + 3 * INTER / CLUSTER + 32) * sizeof(float);
    auto kernel = layer_chain_kernel<CLUSTER, STAGES>;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared_bytes) != cudaSuccess)
        return 2;
    if (CLUSTER > 8 && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)
        return 3;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(CLUSTER);
    config.blockDim = dim3(THREADS);
    config.dynamicSmemBytes = shared_bytes;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = CLUSTER;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess || clusters < 1) return 4;
    if (cudaLaunchKernelEx(&config, kernel, shape, norm_weights, x0, residuals, layers, ahead, ring_only, stamps) !=
        cudaSuccess)
        return 5;
    return cudaGetLastError() == cudaSuccess ? 0 : 6;
}

}  // namespace

// One cluster of `cluster` blocks (8 or 16) with a ring of `stages` slots (6 or 8) runs `layers` layers. Weights:
// qkv (layers × 960 × 576), o (layers × 576 × 576), gate/up interleaved (layers × 3,072 × 576), down (layers × 576
// × 1,536); norm weights (layers × 2 × 576); x0 (576); residuals (layers × 576, fp32) receives r after each layer;
// stamps (layers × 9) or null. With ring_only, the consumers only wait for each slot and hand it back: the weights'
// stream alone, no sums. 0 on success; 1 an unbuilt cluster size or ring, 2-6 a CUDA error (attribute, cluster
// size, residency, launch).
extern "C" int cluster_layer_chain(const void* qkv, const void* o, const void* gate_up, const void* down,
                                   const void* norm_weights, const void* x0, float* residuals, int layers,
                                   int cluster, int stages, int ahead, int ring_only, long long* stamps,
                                   void* stream) {
    Layer shape;
    shape.p[0] = {static_cast<const __half*>(qkv), QKV, HIDDEN, 16};
    shape.p[1] = {static_cast<const __half*>(o), HIDDEN, HIDDEN, 16};
    shape.p[2] = {static_cast<const __half*>(gate_up), 2 * INTER, HIDDEN, 16};
    shape.p[3] = {static_cast<const __half*>(down), HIDDEN, INTER, 8};
    const __half* norms = static_cast<const __half*>(norm_weights);
    const __half* x = static_cast<const __half*>(x0);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (cluster == 8 && stages == 6)
        return launch<8, 6>(shape, norms, x, residuals, layers, ahead, ring_only, stamps, s);
    if (cluster == 8 && stages == 8)
        return launch<8, 8>(shape, norms, x, residuals, layers, ahead, ring_only, stamps, s);
    if (cluster == 16 && stages == 6)
        return launch<16, 6>(shape, norms, x, residuals, layers, ahead, ring_only, stamps, s);
    if (cluster == 16 && stages == 8)
        return launch<16, 8>(shape, norms, x, residuals, layers, ahead, ring_only, stamps, s);
    return 1;
}
