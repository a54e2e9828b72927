"""Custom socket types of the pack."""
from comfy_api.latest import io

Calibration = io.Custom("LOWBIT_CALIBRATION")
Options = io.Custom("LOWBIT_OPTIONS")
