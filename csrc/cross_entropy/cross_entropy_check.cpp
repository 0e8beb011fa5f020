// See cross_entropy_check.h.
#include "cross_entropy/cross_entropy_check.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace dlext {
namespace {

std::atomic<bool>& check_flag() {
  static std::atomic<bool> flag([] {
    const char* env = std::getenv("DLEXT_CE_CHECK_TARGETS");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }());
  return flag;
}

}  // namespace

bool cross_entropy_check_targets() { return check_flag().load(std::memory_order_relaxed); }

bool set_cross_entropy_check_targets(bool enabled) { return check_flag().exchange(enabled); }

}  // namespace dlext
