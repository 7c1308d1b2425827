"""Stage 1 of the data path: text -> tokens -> model forward with hooks -> per-layer HDF5 shards + manifest."""
