"""LoRA Network: ranks, alphas and module filters (the job file's `network` section)."""

from __future__ import annotations

from comfy_api.latest import io

from trainer.comfy_bridge import network_config

from .common import CATEGORY, PREFIX, PTNetwork


class LoRANetwork(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}LoRANetwork",
            display_name="LoRA Network",
            category=CATEGORY,
            description="The LoRA's shape. 'linear' covers Linear layers and 1x1 convs, 'conv' convs with a "
                        "larger kernel (UNet resnets; in Wan only the patch embedding). A phase schedule moves "
                        "the alpha of one group during training.",
            inputs=[
                io.Int.Input("linear", default=16, min=0, max=1024, tooltip="Rank of linear layers (0: none)"),
                io.Float.Input("linear_alpha", default=16.0, min=0.0, max=4096.0, step=0.5,
                               tooltip="Alpha of linear layers; the update is scaled by alpha / rank"),
                io.Int.Input("conv", default=0, min=0, max=1024, tooltip="Rank of conv layers (0: none)"),
                io.Float.Input("conv_alpha", default=0.0, min=0.0, max=4096.0, step=0.5,
                               tooltip="Alpha of conv layers (the group the seed's schedule moves on UNets)"),
                io.String.Input("only_if_contains", default="", optional=True,
                                tooltip="Comma-separated module-name parts; when set, only matching modules train"),
                io.String.Input("ignore_if_contains", default="", optional=True,
                                tooltip="Comma-separated module-name parts to leave out"),
                io.Float.Input("dropout", default=0.0, min=0.0, max=0.9, step=0.01, optional=True),
            ],
            outputs=[PTNetwork.Output(display_name="network")],
        )

    @classmethod
    def execute(cls, linear: int, linear_alpha: float, conv: int, conv_alpha: float, only_if_contains: str = "",
                ignore_if_contains: str = "", dropout: float = 0.0) -> io.NodeOutput:
        return io.NodeOutput(network_config(linear=linear, linear_alpha=linear_alpha, conv=conv,
                                            conv_alpha=conv_alpha, only_if_contains=only_if_contains,
                                            ignore_if_contains=ignore_if_contains, dropout=dropout))
