"""The base layer: devices and precision (device.py), files written atomically and published whole
(files.py), interleaved timing (timing.py). Nothing here knows of models, data or runs.
"""
