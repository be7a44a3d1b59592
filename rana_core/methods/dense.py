"""The unmodified model: no adapters, the reference every other method is measured against."""


def build(loaded, calib_windows, config, progress, cache_dir=None):
    return []
