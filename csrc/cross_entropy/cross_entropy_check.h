// Whether the CUDA cross-entropy operators check class-index targets on the host. A target out of
// [0, C) (and not ignore_index) is found on the device for the cost of an integer minimum, but
// raising it as a Python exception takes one 8-byte copy to the host, which waits for the
// kernels: a host synchronisation per call. On by default (the CPU operators always check, and a
// device assert would kill the CUDA context); DLEXT_CE_CHECK_TARGETS=0 at start-up or
// dlext.cross_entropy_check_targets(False) turns it off, and it is skipped while the current
// stream is capturing a CUDA graph. Unchecked, an out-of-range target reads nothing out of
// bounds: its row's loss and gradient are NaN.
#pragma once

namespace dlext {

bool cross_entropy_check_targets();

// Sets the option; returns the previous setting.
bool set_cross_entropy_check_targets(bool enabled);

}  // namespace dlext
