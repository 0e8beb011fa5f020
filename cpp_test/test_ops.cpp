// C++ test of the LibTorch build: calls dlext ops through the dispatcher (csrc/api.h) and checks
// them against values computed here. Run by ctest; exits non-zero on the first failure.
#include <ATen/ATen.h>

#include <cstdio>
#include <cstdlib>

#include "api.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++failures;
}

void test_relu(const at::Device& device) {
  at::manual_seed(0);
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(device);
  const at::Tensor x = at::randn({13, 97}, opts);
  const at::Tensor expected = at::where(x < 0, at::zeros_like(x), x);
  const at::Tensor y = dlext::relu(x);
  expect(at::equal(y, expected), "relu forward");

  const at::Tensor g = at::randn({13, 97}, opts);
  const at::Tensor dx = dlext::relu_backward(g, y);
  expect(at::equal(dx, at::where(y > 0, g, at::zeros_like(g))), "relu backward");

  at::Tensor z = x.clone();
  at::Tensor& same = dlext::relu_(z);
  expect(same.is_same(z) && at::equal(z, expected), "relu_ in place");

  bool threw = false;
  try {
    dlext::relu(at::ones({3}, at::TensorOptions().dtype(at::kBool).device(device)));
  } catch (const c10::Error&) {
    threw = true;
  }
  expect(threw, "relu rejects bool input with a c10::Error");
}

}  // namespace

int main() {
  test_relu(at::kCPU);
  if (at::hasCUDA()) test_relu(at::Device(at::kCUDA, 0));
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
