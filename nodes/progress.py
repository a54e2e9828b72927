"""Progress callback for quant_core work: drives ComfyUI's progress bar, logs a time estimate, honours
interrupts."""
import logging
import time

import comfy.model_management
import comfy.utils

ESTIMATE_AFTER_S = 5.0  # first estimate once this much work has been timed (a few layers)


def comfy_progress(task: str = "work"):
    bar, t0, start, estimated = None, None, 0, False

    def update(done, total, what):
        nonlocal bar, t0, start, estimated
        comfy.model_management.throw_exception_if_processing_interrupted()
        if bar is None:  # a resumed run starts past 0: rates count from where it started
            bar, t0, start = comfy.utils.ProgressBar(total), time.perf_counter(), done
        bar.update_absolute(done, total)
        elapsed = time.perf_counter() - t0
        if not estimated and done > start and elapsed >= ESTIMATE_AFTER_S and done < total:
            estimated = True
            logging.info(f"LowBit {task}: {done}/{total} done, about "
                         f"{elapsed / (done - start) * (total - done):.0f} s left (estimate from the first units)")
    return update
