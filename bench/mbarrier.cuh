// The mbarrier and bulk-copy primitives the persistent CUDA benches share (stream_ahead.cu, cluster_layer.cu):
// a shared-memory ring filled by cp.async.bulk copies that complete on mbarriers (sm_90).
#pragma once

#include <cstdint>

namespace {

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

__device__ __forceinline__ void barrier_init(uint64_t* barrier, uint32_t arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(barrier)), "r"(arrivals));
}

__device__ __forceinline__ void barrier_expect_bytes(uint64_t* barrier, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(barrier)),
                 "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void barrier_arrive(uint64_t* barrier) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(shared_address(barrier)) : "memory");
}

// Wait until the barrier's phase of this parity has completed. A fresh barrier counts its phase "before the
// first" (parity 1) as complete, so a producer waiting on `empty` with parity 1 passes at once. With CLUSTER, the
// wait acquires at cluster scope what blocks arriving from elsewhere in the cluster released.
template <bool CLUSTER = false>
__device__ __forceinline__ void barrier_wait(uint64_t* barrier, uint32_t parity) {
    uint32_t done = 0;
    do {
        if (CLUSTER)
            asm volatile(
                "{\n .reg .pred complete;\n"
                " mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 complete, [%1], %2;\n"
                " selp.u32 %0, 1, 0, complete;\n}"
                : "=r"(done)
                : "r"(shared_address(barrier)), "r"(parity)
                : "memory");
        else
            asm volatile(
                "{\n .reg .pred complete;\n"
                " mbarrier.try_wait.parity.shared::cta.b64 complete, [%1], %2;\n"
                " selp.u32 %0, 1, 0, complete;\n}"
                : "=r"(done)
                : "r"(shared_address(barrier)), "r"(parity)
                : "memory");
    } while (!done);
}

__device__ __forceinline__ void bulk_copy(void* destination, const void* source, uint32_t bytes,
                                          uint64_t* barrier) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     shared_address(destination)),
                 "l"(source), "r"(bytes), "r"(shared_address(barrier))
                 : "memory");
}

}  // namespace
