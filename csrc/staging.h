// Asynchronous host->device staging of gathered auxiliary rows (CUDA builds only).
//
// A ring of pinned host buffers: prefetch() gathers rows idx of a CPU store into the next
// pinned slot (multi-threaded, on the calling thread) and enqueues the host->device copy on a
// side stream, recording an event; take() makes the current stream wait on that event and
// hands the device rows over. Called for batch t+1 while batch t computes, the copy overlaps
// the computation. A slot's pinned buffer is reused only after its previous copy finished.
//
// What the ring accepts (the same rule as the Python front end, ops.StagingRing, which checks it
// before calling this class): ticket n uses slot n % slots; prefetch() of ticket n is refused
// while ticket n - slots has not been taken; take() accepts any pending ticket, in any order.
#pragma once

#ifdef LAYERPAR_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

namespace layerpar {

class StagingRing {
 public:
  StagingRing(int64_t slots, int64_t device_index);
  // Gather store[idx] into the next pinned slot and start its copy; returns a ticket.
  int64_t prefetch(const at::Tensor& store, const at::Tensor& idx);
  // The device rows of `ticket`, ordered after their copy on the current stream.
  at::Tensor take(int64_t ticket);
  int64_t slots() const { return static_cast<int64_t>(ring_.size()); }

 private:
  struct Slot {
    at::Tensor host;            // pinned staging buffer, grown on demand
    at::Tensor dev;             // device rows, valid once `done` has fired
    at::cuda::CUDAEvent done;   // the host->device copy out of `host` finished
    int64_t ticket = -1;
    bool pending = false;       // prefetched and not yet taken
  };
  std::vector<Slot> ring_;
  c10::Device device_;
  c10::cuda::CUDAStream side_;
  int64_t next_ = 0;
};

}  // namespace layerpar

#endif  // LAYERPAR_WITH_CUDA
