"""Engine-independent GPU kernels for GRACE's packed weights. Each module imports Triton itself, so
``import grace_qat`` works on machines without Triton."""
