// See outputs.h: output allocation with an optional poison fill for tests.
#include "common/outputs.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace dlext {
namespace {

std::atomic<bool>& poison_flag() {
  static std::atomic<bool> flag([] {
    const char* env = std::getenv("DLEXT_POISON_OUTPUTS");
    return env != nullptr && std::strcmp(env, "0") != 0 && env[0] != '\0';
  }());
  return flag;
}

}  // namespace

bool poison_outputs() { return poison_flag().load(std::memory_order_relaxed); }

void set_poison_outputs(bool enabled) { poison_flag().store(enabled); }

at::Tensor& maybe_poison(at::Tensor& t) {
  if (!poison_outputs() || t.numel() == 0) return t;
  if (at::isFloatingType(t.scalar_type()) || at::isComplexType(t.scalar_type())) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  } else if (t.scalar_type() == at::kBool) {
    t.fill_(true);
  } else if (t.scalar_type() == at::kByte) {
    t.fill_(255);
  } else {
    t.fill_(-1);  // all-ones bits in every signed integer width
  }
  return t;
}

at::Tensor new_empty_like(const at::Tensor& ref) {
  at::Tensor t = at::empty_like(ref);
  return maybe_poison(t);
}

at::Tensor new_empty_like(const at::Tensor& ref, const at::TensorOptions& options) {
  at::Tensor t = at::empty_like(ref, options);
  return maybe_poison(t);
}

at::Tensor new_empty(at::IntArrayRef sizes, const at::TensorOptions& options,
                     at::MemoryFormat format) {
  at::Tensor t = at::empty(sizes, options.memory_format(format));
  return maybe_poison(t);
}

}  // namespace dlext
