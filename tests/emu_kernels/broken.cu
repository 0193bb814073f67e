// A kernel that does not compile (an undeclared identifier on line 6), for the compile-error
// tests of the emulated device and of the NVRTC compile gate.

extern "C" __global__ void broken(float* x) {
    int i = threadIdx.x;
    x[i] = undeclared_value * 2.0f;
}
