"""Progress callback for quant_core work: drives ComfyUI's progress bar and honours interrupts."""
import comfy.model_management
import comfy.utils


def comfy_progress():
    bar = None

    def update(done, total, what):
        nonlocal bar
        comfy.model_management.throw_exception_if_processing_interrupted()
        if bar is None:
            bar = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)
    return update
