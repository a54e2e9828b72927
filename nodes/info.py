import json

from comfy_api.latest import io

from ..quant_core.fileformat import module_summary
from .comfy_model import LOWBIT_ATTR


class LowBitModelInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitModelInfo",
            display_name="LowBit Model Info",
            category="LowBit/info",
            description="Reports a MODEL's quantization: method, bits/weight, bytes against fp16, quantized layers.",
            inputs=[io.Model.Input("model", tooltip="Any MODEL; LowBit MODELs report their quantization.")],
            outputs=[io.String.Output(display_name="report", tooltip="JSON report.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        info = getattr(model.model, LOWBIT_ATTR, None)
        summary = module_summary(model.model.diffusion_model)
        report = {"method": info and info.method, "method_config": info and info.method_config, **summary,
                  "size_vs_fp16": round(summary["total_bytes"] / summary["fp16_bytes"], 4)}
        text = json.dumps(report, indent=2)
        return io.NodeOutput(text, ui={"text": [text]})
