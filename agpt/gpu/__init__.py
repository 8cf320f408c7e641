"""CuPy backend and kernels (the GPU trainer issue); every kernel sits beside its NumPy reference."""
