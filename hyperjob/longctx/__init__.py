"""Long-context training pieces for the cpu/cuda trainer: packing, chunked loss, tiled MLP, sequence parallelism."""
