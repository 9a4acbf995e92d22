// The device side of a paged attention step (PagedAttentionBatch), made from the host vectors the
// GPU attention tests build their steps in.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "common/errors.h"
#include "kernels/attention_paged.cuh"
#include "kernels/check.h"
#include "kernels/device_info.h"

namespace ringllama::test {

// Item i: its tokens are rows row0[i] .. row0[i] + count[i] - 1 of q and out, after start[i] cached
// positions, and its block table is tables[i * table_stride, (i + 1) * table_stride). The work
// tiles are attention_paged_tiles' for the GQA group. All arrays lie in one device buffer that
// `batch` points into: keep the object alive while launches read it, and copy `batch`, not the
// object, to change decode_only.
struct DeviceAttentionBatch {
  DeviceAttentionBatch(const std::vector<int32_t>& row0, const std::vector<int32_t>& count,
                       const std::vector<int32_t>& start, const std::vector<int32_t>& tables, int64_t table_stride,
                       int64_t group) {
    const size_t n = row0.size();
    if (n == 0 || count.size() != n || start.size() != n || table_stride <= 0 ||
        tables.size() != n * static_cast<size_t>(table_stride) || group <= 0)
      fail("DeviceAttentionBatch: {} items need as many counts ({}) and starts ({}), {} x table_stride {} table "
           "entries (got {}) and a group > 0 (got {})",
           n, count.size(), start.size(), n, table_stride, tables.size(), group);
    std::vector<int32_t> tile_item, tile_row0;
    attention_paged_tiles(std::vector<int64_t>(count.begin(), count.end()), group, &tile_item, &tile_row0);
    std::vector<int32_t> all;
    const std::vector<int32_t>* parts[] = {&row0, &count, &start, &tables, &tile_item, &tile_row0};
    for (const auto* part : parts) all.insert(all.end(), part->begin(), part->end());
    arrays = DeviceBuffer<int32_t>(all.size(), "attention batch arrays");
    CUDA_CHECK(cudaMemcpy(arrays.get(), all.data(), all.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
    const int32_t* p = arrays.get();
    batch.item_row0 = p;
    batch.item_count = p + n;
    batch.item_start = p + 2 * n;
    batch.block_tables = p + 3 * n;
    batch.table_stride = table_stride;
    batch.tile_item = batch.block_tables + tables.size();
    batch.tile_row0 = batch.tile_item + tile_item.size();
    batch.n_tiles = static_cast<int64_t>(tile_item.size());
  }

  DeviceBuffer<int32_t> arrays;  // row0, count, start, tables, tile_item, tile_row0, in that order
  PagedAttentionBatch batch;
};

}  // namespace ringllama::test
