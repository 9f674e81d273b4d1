#include "registry.h"
namespace slimtron {
void register_helpers(pybind11::module_& m) { (void)m; }
}  // namespace slimtron
