"""Phase Trainer for ComfyUI: LoRA training with progressive alpha phases, plotted live inside the node.

ComfyUI's entry point (V3). Deliberately no NODE_CLASS_MAPPINGS: ComfyUI ignores comfy_entrypoint when a
pack also exports the V1 mappings.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import PhaseTrainerExtension

    return PhaseTrainerExtension()
