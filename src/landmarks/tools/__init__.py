"""Tools over the stages: benchmarks, pictures of predictions, notebooks. They call stage cores and the store, never copies of them."""
