// StagingRing (staging.h): pinned ring + side-stream host->device copies synchronised by events.
#ifdef LAYERPAR_WITH_CUDA

#include "staging.h"

#include "layerpar_ops.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>

#include <utility>

namespace layerpar {

StagingRing::StagingRing(int64_t slots, int64_t device_index)
    : device_(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device_index)),
      side_(c10::cuda::getStreamFromPool(/*isHighPriority=*/false,
                                         static_cast<c10::DeviceIndex>(device_index))) {
  TORCH_CHECK(slots >= 1, "StagingRing: slots must be >= 1, got ", slots);
  ring_.resize(static_cast<size_t>(slots));
}

int64_t StagingRing::prefetch(const at::Tensor& store, const at::Tensor& idx) {
  TORCH_CHECK(store.device().is_cpu(), "StagingRing.prefetch: the store must be a CPU tensor");
  Slot& sl = ring_[static_cast<size_t>(next_ % slots())];
  TORCH_CHECK(!sl.pending, "StagingRing.prefetch: ticket ", sl.ticket, " was never taken; at most ",
              slots(), " batches may be in flight");
  if (sl.ticket >= 0) sl.done.synchronize();  // the previous copy out of sl.host has finished
  std::vector<int64_t> shape(store.sizes().begin(), store.sizes().end());
  shape[0] = idx.numel();
  int64_t need = 1;
  for (int64_t v : shape) need *= v;
  if (!sl.host.defined() || sl.host.numel() < need || sl.host.scalar_type() != store.scalar_type()) {
    sl.host = at::empty({std::max<int64_t>(need, 1)}, store.options().pinned_memory(true));
  }
  at::Tensor host = sl.host.narrow(0, 0, need).view(shape);
  gather_rows_out(store, idx, host);
  {
    c10::cuda::CUDAStreamGuard guard(side_);
    sl.dev = at::empty(shape, store.options().device(device_));  // allocated on the side stream
    sl.dev.copy_(host, /*non_blocking=*/true);
    sl.done.record(side_);
  }
  sl.ticket = next_++;
  sl.pending = true;
  return sl.ticket;
}

at::Tensor StagingRing::take(int64_t ticket) {
  for (Slot& sl : ring_) {
    if (sl.pending && sl.ticket == ticket) {
      c10::cuda::CUDAStream cur = c10::cuda::getCurrentCUDAStream(device_.index());
      sl.done.block(cur);
      at::Tensor out = std::move(sl.dev);
      sl.dev = at::Tensor();
      // The block was allocated on the side stream; tell the allocator the current stream uses it.
      c10::cuda::CUDACachingAllocator::recordStream(out.storage().data_ptr(), cur);
      sl.pending = false;
      return out;
    }
  }
  TORCH_CHECK(false, "StagingRing.take: no pending ticket ", ticket);
}

}  // namespace layerpar

#endif  // LAYERPAR_WITH_CUDA
