// Entry point of the slimtron._C extension. Each csrc/*.cpp file registers its own functions.
#include <pybind11/pybind11.h>

#include "registry.h"

PYBIND11_MODULE(_C, m) {
    m.doc() = "slimtron C++ core: indexed dataset builder and dataset index helpers";
    slimtron::register_indexed_dataset(m);
    slimtron::register_helpers(m);
}
