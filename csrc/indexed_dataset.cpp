// Writer of the memory-mapped indexed dataset (.bin tokens + .idx index), byte-compatible with
// Megatron-Core. The Python face (slimtron/data/indexed_dataset.py) converts tokens to numpy arrays
// of the corpus dtype and parses existing indexes; this file owns the buffered writing and the
// index bookkeeping.
//
// .idx layout: magic "MMIDIDX\0\0", <Q version 1, <B dtype code, <Q sequence count, <Q document
// index count, int32 sequence lengths, int64 byte pointers, int64 document indices.
#include <pybind11/numpy.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "registry.h"

namespace py = pybind11;

namespace slimtron {
namespace {

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kVersion = 1;
constexpr size_t kBufferBytes = 8 << 20;

// A failed read or write of a file; translated to Python's OSError.
struct IoError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

IoError io_error(const std::string& what, const std::string& path) {
    return IoError(path + ": " + what + " (" + std::strerror(errno) + ")");
}

// A FILE* opened for writing with a large buffer, closed (and checked) exactly once.
class OutputFile {
   public:
    explicit OutputFile(const std::string& path) : path_(path), buffer_(kBufferBytes) {
        file_ = std::fopen(path.c_str(), "wb");
        if (file_ == nullptr) throw io_error("cannot open for writing", path);
        std::setvbuf(file_, buffer_.data(), _IOFBF, buffer_.size());
    }
    OutputFile(const OutputFile&) = delete;
    OutputFile& operator=(const OutputFile&) = delete;
    ~OutputFile() {
        if (file_ != nullptr) std::fclose(file_);
    }

    void write(const void* data, size_t bytes) {
        if (bytes > 0 && std::fwrite(data, 1, bytes, file_) != bytes) throw io_error("write failed", path_);
    }

    template <typename T>
    void write_value(T value) {
        static_assert(std::is_arithmetic_v<T>);
        write(&value, sizeof(T));  // the format is little-endian, like every host we build for
    }

    void close() {
        if (file_ == nullptr) return;
        int status = std::fclose(file_);
        file_ = nullptr;
        if (status != 0) throw io_error("close failed", path_);
    }

    bool is_open() const { return file_ != nullptr; }
    const std::string& path() const { return path_; }

   private:
    std::string path_;
    std::vector<char> buffer_;
    std::FILE* file_ = nullptr;
};

// Appends the whole of `path` to `out`; returns the number of bytes copied.
uint64_t append_file(OutputFile& out, const std::string& path) {
    std::FILE* in = std::fopen(path.c_str(), "rb");
    if (in == nullptr) throw io_error("cannot open for reading", path);
    std::vector<char> chunk(kBufferBytes);
    uint64_t copied = 0;
    size_t got;
    while ((got = std::fread(chunk.data(), 1, chunk.size(), in)) > 0) {
        out.write(chunk.data(), got);
        copied += got;
    }
    bool failed = std::ferror(in) != 0;
    std::fclose(in);
    if (failed) throw io_error("read failed", path);
    return copied;
}

class IndexedDatasetWriter {
   public:
    IndexedDatasetWriter(const std::string& bin_path, const std::string& idx_path, int dtype_code,
                         int itemsize)
        : bin_(bin_path), idx_path_(idx_path), dtype_code_(dtype_code), itemsize_(itemsize) {
        if (dtype_code < 1 || dtype_code > 255) throw std::invalid_argument("dtype code out of range");
        if (itemsize < 1 || itemsize > 8) throw std::invalid_argument("itemsize must be 1..8 bytes");
        document_indices_.push_back(0);
    }

    // Appends the tokens of one or more sequences; `lengths` split them (their sum is checked).
    void add_sequences(const py::array& tokens, const py::array_t<int64_t, py::array::c_style>& lengths) {
        check_open();
        check_tokens(tokens);
        auto lens = lengths.unchecked<1>();
        int64_t total = 0;
        for (py::ssize_t i = 0; i < lens.shape(0); ++i) {
            if (lens(i) < 0 || lens(i) > std::numeric_limits<int32_t>::max())
                throw std::invalid_argument("sequence length " + std::to_string(lens(i)) +
                                            " is outside 0..2^31-1");
            total += lens(i);
        }
        if (total != tokens.size())
            throw std::invalid_argument("sequence lengths sum to " + std::to_string(total) + " but " +
                                        std::to_string(tokens.size()) + " tokens were given");
        for (py::ssize_t i = 0; i < lens.shape(0); ++i) lengths_.push_back(static_cast<int32_t>(lens(i)));
        const void* data = tokens.data();
        size_t bytes = static_cast<size_t>(tokens.nbytes());
        py::gil_scoped_release release;  // `tokens` keeps the buffer alive while we write it
        bin_.write(data, bytes);
    }

    void end_document() {
        check_open();
        document_indices_.push_back(static_cast<int64_t>(lengths_.size()));
    }

    // Appends another corpus whose index the caller has already parsed and validated.
    void append_corpus(const py::array_t<int32_t, py::array::c_style>& lengths,
                       const py::array_t<int64_t, py::array::c_style>& document_indices,
                       const std::string& bin_path) {
        check_open();
        auto lens = lengths.unchecked<1>();
        auto docs = document_indices.unchecked<1>();
        if (docs.shape(0) < 1 || docs(0) != 0)
            throw std::invalid_argument(bin_path + ": document indices must start at 0");
        uint64_t expected_bytes = 0;
        for (py::ssize_t i = 0; i < lens.shape(0); ++i)
            expected_bytes += static_cast<uint64_t>(lens(i)) * static_cast<uint64_t>(itemsize_);
        const int64_t offset = static_cast<int64_t>(lengths_.size());
        for (py::ssize_t i = 0; i < lens.shape(0); ++i) lengths_.push_back(lens(i));
        for (py::ssize_t i = 1; i < docs.shape(0); ++i) document_indices_.push_back(offset + docs(i));
        uint64_t copied;
        {
            py::gil_scoped_release release;
            copied = append_file(bin_, bin_path);
        }
        if (copied != expected_bytes)
            throw std::invalid_argument(bin_path + ": holds " + std::to_string(copied) +
                                        " bytes but its index implies " + std::to_string(expected_bytes));
    }

    // Closes the .bin and writes the .idx; the writer cannot be used afterwards.
    void finalize() {
        check_open();
        py::gil_scoped_release release;
        bin_.close();
        OutputFile idx(idx_path_);
        idx.write(kMagic, sizeof(kMagic));
        idx.write_value<uint64_t>(kVersion);
        idx.write_value<uint8_t>(static_cast<uint8_t>(dtype_code_));
        idx.write_value<uint64_t>(lengths_.size());
        idx.write_value<uint64_t>(document_indices_.size());
        idx.write(lengths_.data(), lengths_.size() * sizeof(int32_t));
        write_pointers(idx);
        idx.write(document_indices_.data(), document_indices_.size() * sizeof(int64_t));
        idx.close();
    }

    bool finalized() const { return !bin_.is_open(); }

   private:
    void check_open() const {
        if (!bin_.is_open()) throw std::runtime_error(bin_.path() + ": builder already finalized");
    }

    void check_tokens(const py::array& tokens) const {
        if (tokens.ndim() != 1) throw std::invalid_argument("tokens must be a 1-D array");
        if (tokens.itemsize() != itemsize_)
            throw std::invalid_argument("tokens have " + std::to_string(tokens.itemsize()) +
                                        "-byte items but the corpus dtype has " + std::to_string(itemsize_));
        if (!(tokens.flags() & py::array::c_style)) throw std::invalid_argument("tokens must be contiguous");
    }

    // Byte offset of each sequence in the .bin, streamed in chunks to bound memory.
    void write_pointers(OutputFile& idx) const {
        std::vector<int64_t> chunk;
        chunk.reserve(1 << 16);
        int64_t pointer = 0;
        for (int32_t length : lengths_) {
            chunk.push_back(pointer);
            pointer += static_cast<int64_t>(length) * itemsize_;
            if (chunk.size() == chunk.capacity()) {
                idx.write(chunk.data(), chunk.size() * sizeof(int64_t));
                chunk.clear();
            }
        }
        idx.write(chunk.data(), chunk.size() * sizeof(int64_t));
    }

    OutputFile bin_;
    std::string idx_path_;
    int dtype_code_;
    int itemsize_;
    std::vector<int32_t> lengths_;
    std::vector<int64_t> document_indices_;
};

}  // namespace

void register_indexed_dataset(py::module_& m) {
    py::register_exception<IoError>(m, "IoError", PyExc_OSError);
    py::class_<IndexedDatasetWriter>(m, "IndexedDatasetWriter",
                                     "Buffered writer of a .bin/.idx pair (use slimtron.data.IndexedDatasetBuilder)")
        .def(py::init<const std::string&, const std::string&, int, int>(), py::arg("bin_path"),
             py::arg("idx_path"), py::arg("dtype_code"), py::arg("itemsize"))
        .def("add_sequences", &IndexedDatasetWriter::add_sequences, py::arg("tokens"), py::arg("lengths"))
        .def("end_document", &IndexedDatasetWriter::end_document)
        .def("append_corpus", &IndexedDatasetWriter::append_corpus, py::arg("lengths"),
             py::arg("document_indices"), py::arg("bin_path"))
        .def("finalize", &IndexedDatasetWriter::finalize)
        .def_property_readonly("finalized", &IndexedDatasetWriter::finalized);
}

}  // namespace slimtron
