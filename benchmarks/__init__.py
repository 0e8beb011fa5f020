"""dlext kernel benchmarks: each op forward and forward+backward against native torch.

    python -m benchmarks [--device cpu|cuda|all] [--ops relu,...] [--quick]
    python -m dlext bench ...            (the same, from a checkout)

Every case is validated against native before it is timed. Results: JSON, a markdown table and a
PNG chart in benchmarks/results/, named after the device.
"""
