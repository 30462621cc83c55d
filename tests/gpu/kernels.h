#pragma once
// Test kernels (kernels.cu). Returns a cudaError_t as int.
#include <cstddef>

int launchSpinThenFill(float* out, size_t count, float value, unsigned spinMs, void* stream);
