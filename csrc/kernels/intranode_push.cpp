// The copying half of a pushing intranode combine (kernels/intranode.cu): this
// rank's rows for each owner, copied by a copy engine into the owner's landing
// area in chunks, each chunk followed by a stream memory operation that raises
// the owner's count of landed chunks from this rank. No SM takes part; the
// owner's combine kernel sums each token once the chunks holding its rows have
// landed, so the sums of early chunks run under the copies of later ones.
#include <cuda_runtime_api.h>

#include <cstddef>

#include "kernels/intranode.h"
#include "runtime/driver_api.h"
#include "runtime/error.h"
#include "runtime/stream_order.h"

namespace deepcomm::intranode {

namespace {

uintptr_t handle_of(cudaStream_t stream) { return reinterpret_cast<uintptr_t>(stream); }

// Each owner's chunks, one copy and one signal a chunk, on streams[owner].
void push_rows(const Context& ctx, const CombineArgs& combine, const PushArgs& args,
               const cudaStream_t (&streams)[kMaxRanks]) {
  const int64_t row_bytes = 2LL * combine.hidden;
  // Owners in turn from the next rank on, so that the ranks' first chunks go to different owners.
  for (int step = 1; step < ctx.num_ranks; ++step) {
    const int owner = (ctx.rank + step) % ctx.num_ranks;
    const int64_t rows = args.num_rows[owner], chunk_rows = args.chunk_rows[owner];
    if (rows == 0) continue;
    DC_CHECK_ARG(chunk_rows > 0, "chunk_rows: must be > 0 for an owner that gets rows");
    uint8_t* landing = ctx.regions[owner] + combine.landing.offset + args.landing_row[owner] * row_bytes;
    const uint8_t* source = combine.own_rows + args.first_row[owner] * row_bytes;
    auto* landed = &reinterpret_cast<SignalRegion*>(ctx.regions[owner])->chunks_landed[ctx.rank];
    uint32_t chunks = args.chunks_before[owner];
    for (int64_t row = 0; row < rows; row += chunk_rows) {
      const int64_t bytes = (rows - row < chunk_rows ? rows - row : chunk_rows) * row_bytes;
      DC_CUDA_CHECK(cudaMemcpyAsync(landing + row * row_bytes, source + row * row_bytes, bytes,
                                    cudaMemcpyDeviceToDevice, streams[owner]));
      driver::stream_write_value32(handle_of(streams[owner]), reinterpret_cast<uintptr_t>(landed), ++chunks);
    }
  }
}

}  // namespace

void launch_pushed_combine(const Context& ctx, const CombineArgs& args, const PushArgs& push, cudaStream_t stream,
                           const cudaStream_t (&copy_streams)[kMaxRanks]) {
  DC_CHECK_ARG(args.own_rows != nullptr, "own_rows: the rows this rank pushes");
  launch_combine_ready(ctx, args, stream);
  // The copies start once every peer has met: its landing area is free (its previous combine read it).
  for (int owner = 0; owner < ctx.num_ranks; ++owner)
    if (owner != ctx.rank && push.num_rows[owner] > 0) order_streams(handle_of(copy_streams[owner]), handle_of(stream));
  // The sums are queued before the copies: queueing a copy takes the host microseconds, and the sums
  // of the first chunks should run while later ones are still being queued and copied.
  launch_combine_sums(ctx, args, stream);
  push_rows(ctx, args, push, copy_streams);
  // What follows the combine on `stream` (the caller's event) also follows the copies: the rows may then be reused.
  for (int owner = 0; owner < ctx.num_ranks; ++owner)
    if (owner != ctx.rank && push.num_rows[owner] > 0) order_streams(handle_of(stream), handle_of(copy_streams[owner]));
}

}  // namespace deepcomm::intranode
