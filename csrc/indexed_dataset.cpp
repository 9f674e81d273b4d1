#include "registry.h"
namespace slimtron {
void register_indexed_dataset(pybind11::module_& m) { (void)m; }
}  // namespace slimtron
