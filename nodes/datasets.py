"""Dataset nodes: folders (scanned when the node runs, so a bad file is reported on this node), IMAGE batches
from the graph, and merging. Each outputs PT_DATASET (trainer.comfy_bridge.Dataset)."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from trainer.comfy_bridge import (
    TYPED_PATH,
    dataset_config,
    folder_dataset,
    folder_fingerprint,
    images_dataset,
    input_subfolders,
    merge_datasets,
    resolve_input_folder,
)
from trainer.data.video import STRATEGIES

from .common import CATEGORY, PREFIX, PTDataset, log_line


def _folder_inputs() -> list:
    folders = input_subfolders(folder_paths.get_input_directory())
    return [
        io.Combo.Input("folder", options=folders + [TYPED_PATH], default=folders[0] if folders else TYPED_PATH,
                       tooltip="A subfolder of ComfyUI's input folder (a shared workflow then finds it on another "
                               "machine). Media files with same-name caption files (.txt)."),
        io.String.Input("path", default="", optional=True,
                        tooltip="Optional: an absolute folder path, used instead of the folder picked above"),
        io.String.Input("resolution", default="512",
                        tooltip="Training size(s) in pixels: one number, or several (512, 768) to train each "
                                "file at each size. Images are never upscaled."),
        io.String.Input("trigger_word", default="", tooltip="Put in front of every caption (unless present)"),
        io.String.Input("caption_ext", default="txt", tooltip="Extension of the caption files"),
        io.String.Input("default_caption", default="", tooltip="Caption of files that have no caption file"),
        io.Float.Input("caption_dropout_rate", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Share of steps that train a sample with an empty caption"),
        io.Int.Input("num_repeats", default=1, min=1, max=10000, tooltip="Times each file is seen per epoch"),
        io.Boolean.Input("cache_latents_to_disk", default=False, optional=True,
                         tooltip="Keep encoded latents in a hidden cache folder beside the media for later runs"),
        io.Combo.Input("on_bad_file", options=["error", "skip"], default="error", optional=True,
                       tooltip="error: stop and name the file; skip: warn and train without it"),
    ]


def _resolve(folder: str, path: str):
    return resolve_input_folder(folder, path, folder_paths.get_input_directory(), "folder")


class ImageFolderDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}ImageFolderDataset",
            display_name="Image Folder Dataset",
            category=CATEGORY,
            description="A folder of images (png, jpg, webp) with same-name .txt captions.",
            inputs=_folder_inputs(),
            outputs=[PTDataset.Output(display_name="dataset")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder=None, path="", **kwargs):
        # Re-scan when files in the folder change, although the node's settings did not.
        try:
            return folder_fingerprint(_resolve(folder, path))
        except Exception as exc:  # an invalid choice: execute() reports it
            return str(exc)

    @classmethod
    def execute(cls, folder: str, resolution: str, trigger_word: str, caption_ext: str, default_caption: str,
                caption_dropout_rate: float, num_repeats: int, path: str = "", cache_latents_to_disk: bool = False,
                on_bad_file: str = "error") -> io.NodeOutput:
        cfg = dataset_config(_resolve(folder, path), caption_ext=caption_ext, trigger_word=trigger_word,
                             default_caption=default_caption, caption_dropout_rate=caption_dropout_rate,
                             resolution=resolution, num_repeats=num_repeats,
                             cache_latents_to_disk=cache_latents_to_disk, on_bad_file=on_bad_file)
        dataset = folder_dataset(cfg, video=False, log=log_line)
        log_line(f"dataset {dataset.describe()}")
        return io.NodeOutput(dataset)


class VideoFolderDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}VideoFolderDataset",
            display_name="Video Folder Dataset",
            category=CATEGORY,
            description="A folder of clips (mp4, webm, mov, mkv; images too) with same-name .txt captions.",
            inputs=_folder_inputs() + [
                io.Int.Input("num_frames", default=33, min=1, max=1025,
                             tooltip="Frames per training sample, spread over the clip (Wan: 4k+1, e.g. 33, 81)"),
                io.Combo.Input("frame_sampling", options=list(STRATEGIES), default="auto", optional=True,
                               tooltip="How frames are read: decode every frame, seek to keyframes, or auto"),
            ],
            outputs=[PTDataset.Output(display_name="dataset")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder=None, path="", **kwargs):
        try:
            return folder_fingerprint(_resolve(folder, path))
        except Exception as exc:
            return str(exc)

    @classmethod
    def execute(cls, folder: str, resolution: str, trigger_word: str, caption_ext: str, default_caption: str,
                caption_dropout_rate: float, num_repeats: int, num_frames: int, path: str = "",
                cache_latents_to_disk: bool = False, on_bad_file: str = "error",
                frame_sampling: str = "auto") -> io.NodeOutput:
        cfg = dataset_config(_resolve(folder, path), caption_ext=caption_ext, trigger_word=trigger_word,
                             default_caption=default_caption, caption_dropout_rate=caption_dropout_rate,
                             resolution=resolution, num_repeats=num_repeats, num_frames=num_frames,
                             frame_sampling=frame_sampling, cache_latents_to_disk=cache_latents_to_disk,
                             on_bad_file=on_bad_file)
        dataset = folder_dataset(cfg, video=True, log=log_line)
        log_line(f"dataset {dataset.describe()}")
        return io.NodeOutput(dataset)


class ImagesToDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}ImagesToDataset",
            display_name="Images to Dataset",
            category=CATEGORY,
            description="Train on images made in this graph (e.g. by a sampler): each image a sample, or the "
                        "whole batch as one clip.",
            inputs=[
                io.Image.Input("images"),
                io.String.Input("captions", default="", multiline=True,
                                tooltip="One line per image, or a single line for all of them"),
                io.Boolean.Input("as_video", default=False,
                                 tooltip="Train the batch as one clip of B frames (video families)"),
                io.String.Input("trigger_word", default=""),
                io.String.Input("resolution", default="",
                                tooltip="Empty: train at the images' own size; or sizes such as 512, 768"),
                io.Float.Input("caption_dropout_rate", default=0.0, min=0.0, max=1.0, step=0.01),
                io.Int.Input("num_repeats", default=1, min=1, max=10000),
            ],
            outputs=[PTDataset.Output(display_name="dataset")],
        )

    @classmethod
    def execute(cls, images, captions: str, as_video: bool, trigger_word: str, resolution: str,
                caption_dropout_rate: float, num_repeats: int) -> io.NodeOutput:
        dataset = images_dataset(images, captions, as_video=as_video, trigger_word=trigger_word,
                                 resolution=resolution, caption_dropout_rate=caption_dropout_rate,
                                 num_repeats=num_repeats)
        log_line(f"dataset {dataset.describe()}")
        return io.NodeOutput(dataset)


class MergeDatasets(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}MergeDatasets",
            display_name="Merge Datasets",
            category=CATEGORY,
            description="Train on several datasets together (each keeps its own settings).",
            inputs=[
                PTDataset.Input("dataset_1"),
                PTDataset.Input("dataset_2"),
                PTDataset.Input("dataset_3", optional=True),
                PTDataset.Input("dataset_4", optional=True),
            ],
            outputs=[PTDataset.Output(display_name="dataset")],
        )

    @classmethod
    def execute(cls, dataset_1, dataset_2, dataset_3=None, dataset_4=None) -> io.NodeOutput:
        return io.NodeOutput(merge_datasets(dataset_1, dataset_2, dataset_3, dataset_4))
