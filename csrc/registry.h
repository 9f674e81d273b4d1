#pragma once
#include <pybind11/pybind11.h>

namespace slimtron {
// csrc/indexed_dataset.cpp: IndexedDatasetWriter (the .bin/.idx writer behind IndexedDatasetBuilder).
void register_indexed_dataset(pybind11::module_& m);
// csrc/helpers.cpp: build_sample_idx, build_blending_indices.
void register_helpers(pybind11::module_& m);
}  // namespace slimtron
