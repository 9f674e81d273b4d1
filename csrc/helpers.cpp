// Index builders of the GPT and blended datasets (slimtron/data/gpt_dataset.py, blended_dataset.py).
// Both are sequential loops over up to billions of tokens, hence C++; they run without the GIL.
#include <pybind11/numpy.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "registry.h"

namespace py = pybind11;

namespace slimtron {
namespace {

using Int32Array = py::array_t<int32_t, py::array::c_style>;
using Int64Array = py::array_t<int64_t, py::array::c_style>;
using DoubleArray = py::array_t<double, py::array::c_style>;

// Checks every document id and that the documents hold exactly num_epochs * tokens_per_epoch tokens.
template <typename DocT>
void check_document_index(const int32_t* sizes, int64_t num_sizes, const DocT* doc_idx, int64_t num_docs,
                          int64_t expected_tokens) {
    int64_t total = 0;
    for (int64_t i = 0; i < num_docs; ++i) {
        const int64_t doc = doc_idx[i];
        if (doc < 0 || doc >= num_sizes)
            throw std::invalid_argument("build_sample_idx: doc_idx[" + std::to_string(i) + "] = " +
                                        std::to_string(doc) + " is outside 0.." + std::to_string(num_sizes - 1));
        if (sizes[doc] < 0)
            throw std::invalid_argument("build_sample_idx: negative size of document " + std::to_string(doc));
        total += sizes[doc];
    }
    if (total != expected_tokens)
        throw std::invalid_argument("build_sample_idx: the documents hold " + std::to_string(total) +
                                    " tokens, not num_epochs * tokens_per_epoch = " +
                                    std::to_string(expected_tokens));
}

// Sample j covers tokens [j * seq_length, (j + 1) * seq_length] of the documents concatenated in
// doc_idx order (seq_length + 1 tokens: inputs plus the shifted label), so consecutive samples
// share one token. Row j holds where token j * seq_length lives: (position in doc_idx, offset in
// that document). Row num_samples therefore marks the last token of the last sample.
template <typename DocT, typename OutT>
void fill_sample_idx(const int32_t* sizes, const DocT* doc_idx, int64_t seq_length, int64_t num_samples,
                     OutT* out) {
    int64_t position = 0;
    int64_t offset = 0;
    out[0] = position;
    out[1] = offset;
    for (int64_t sample = 1; sample <= num_samples; ++sample) {
        int64_t remaining = seq_length;
        while (remaining > 0) {
            const int64_t available = sizes[doc_idx[position]] - offset;
            if (available > remaining) {
                offset += remaining;
                remaining = 0;
            } else {
                remaining -= available;
                ++position;
                offset = 0;
            }
        }
        // Land on the document that holds the token (skips ends of documents and empty ones); the
        // token exists because num_samples * seq_length < the total token count.
        while (offset == sizes[doc_idx[position]]) {
            ++position;
            offset = 0;
        }
        out[2 * sample] = static_cast<OutT>(position);
        out[2 * sample + 1] = static_cast<OutT>(offset);
    }
}

// OutT holds positions in doc_idx (< num_docs) and offsets in a document (< 2^31: sizes are int32).
template <typename DocT, typename OutT>
py::array_t<OutT> build_sample_idx(const Int32Array& sizes, const py::array_t<DocT, py::array::c_style>& doc_idx,
                                   int64_t seq_length, int64_t num_epochs, int64_t tokens_per_epoch) {
    if (sizes.ndim() != 1 || doc_idx.ndim() != 1)
        throw std::invalid_argument("build_sample_idx: sizes and doc_idx must be 1-D");
    if (seq_length < 1 || num_epochs < 1 || tokens_per_epoch < 1)
        throw std::invalid_argument("build_sample_idx: seq_length, num_epochs and tokens_per_epoch must be "
                                    "positive, got " + std::to_string(seq_length) + ", " +
                                    std::to_string(num_epochs) + ", " + std::to_string(tokens_per_epoch));
    const int64_t total_tokens = num_epochs * tokens_per_epoch;
    const int64_t num_samples = (total_tokens - 1) / seq_length;
    const int64_t num_sizes = sizes.shape(0);
    const int64_t num_docs = doc_idx.shape(0);
    if (num_docs > static_cast<int64_t>(std::numeric_limits<OutT>::max()))
        throw std::invalid_argument("build_sample_idx: " + std::to_string(num_docs) +
                                    " document positions do not fit the sample index's integer type");
    py::array_t<OutT> result({num_samples + 1, int64_t{2}});
    const int32_t* sizes_ptr = sizes.data();
    const DocT* doc_ptr = doc_idx.data();
    OutT* out = result.mutable_data();
    {
        py::gil_scoped_release release;
        check_document_index(sizes_ptr, num_sizes, doc_ptr, num_docs, total_tokens);
        fill_sample_idx(sizes_ptr, doc_ptr, seq_length, num_samples, out);
    }
    return result;
}

// Greedy deterministic blending: sample i goes to the dataset whose achieved count lags its target
// weight * i the most (ties to the lowest index); sample_index counts that dataset's draws so far.
// Weights are normalised. Sample 0 uses the target of sample 1, so it goes to the heaviest dataset.
void fill_blending_indices(const double* weights, int64_t num_datasets, int64_t size, int16_t* dataset_index,
                           int64_t* dataset_sample_index) {
    std::vector<int64_t> counts(num_datasets, 0);
    for (int64_t i = 0; i < size; ++i) {
        const double target = std::max(static_cast<double>(i), 1.0);
        int64_t best = 0;
        double best_lag = weights[0] * target - static_cast<double>(counts[0]);
        for (int64_t d = 1; d < num_datasets; ++d) {
            const double lag = weights[d] * target - static_cast<double>(counts[d]);
            if (lag > best_lag) {
                best_lag = lag;
                best = d;
            }
        }
        dataset_index[i] = static_cast<int16_t>(best);
        dataset_sample_index[i] = counts[best]++;
    }
}

std::pair<py::array_t<int16_t>, Int64Array> build_blending_indices(const DoubleArray& weights, int64_t size) {
    if (weights.ndim() != 1 || weights.shape(0) < 1)
        throw std::invalid_argument("build_blending_indices: weights must be a non-empty 1-D array");
    const int64_t num_datasets = weights.shape(0);
    if (num_datasets > std::numeric_limits<int16_t>::max())
        throw std::invalid_argument("build_blending_indices: at most 32767 datasets, got " +
                                    std::to_string(num_datasets));
    if (size < 0) throw std::invalid_argument("build_blending_indices: negative size " + std::to_string(size));
    std::vector<double> normalized(weights.data(), weights.data() + num_datasets);
    double total = 0.0;
    for (int64_t d = 0; d < num_datasets; ++d) {
        if (!std::isfinite(normalized[d]) || normalized[d] < 0)
            throw std::invalid_argument("build_blending_indices: weight " + std::to_string(d) +
                                        " is not a finite non-negative number");
        total += normalized[d];
    }
    if (!(total > 0)) throw std::invalid_argument("build_blending_indices: the weights sum to zero");
    for (double& w : normalized) w /= total;
    py::array_t<int16_t> dataset_index(size);
    Int64Array dataset_sample_index(size);
    int16_t* index_ptr = dataset_index.mutable_data();
    int64_t* sample_ptr = dataset_sample_index.mutable_data();
    {
        py::gil_scoped_release release;
        fill_blending_indices(normalized.data(), num_datasets, size, index_ptr, sample_ptr);
    }
    return {dataset_index, dataset_sample_index};
}

}  // namespace

void register_helpers(py::module_& m) {
    // doc_idx may be int32 or int64; each name returns its integer type (Megatron's pair of names).
    const char* doc = "GPT sample index: [num_samples + 1, 2] of (position in doc_idx, offset), each sample "
                      "spanning seq_length + 1 tokens; num_samples = (num_epochs * tokens_per_epoch - 1) // "
                      "seq_length.";
    m.def("build_sample_idx", &build_sample_idx<int32_t, int64_t>, py::arg("sizes"), py::arg("doc_idx"),
          py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"), doc);
    m.def("build_sample_idx", &build_sample_idx<int64_t, int64_t>, py::arg("sizes"), py::arg("doc_idx"),
          py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"), doc);
    m.def("build_sample_idx_int32", &build_sample_idx<int32_t, int32_t>, py::arg("sizes"), py::arg("doc_idx"),
          py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"), doc);
    m.def("build_sample_idx_int32", &build_sample_idx<int64_t, int32_t>, py::arg("sizes"), py::arg("doc_idx"),
          py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"), doc);
    m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
          "Greedy blending: (dataset_index int16 [size], dataset_sample_index int64 [size]).");
}

}  // namespace slimtron
