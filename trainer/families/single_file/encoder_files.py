"""ComfyUI's Wan encoder files, so a job needs no diffusers folder at all:

- ``model.text_encoder_file``: the umt5 text encoder from models/text_encoders (``umt5_xxl_fp16.safetensors``,
  ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``). ComfyUI's files hold the UMT5-XXL encoder under transformers' T5
  names (``shared.weight``, ``encoder.block.N.layer.*``, ``encoder.final_layer_norm.weight``; comfy/text_encoders/
  t5.py uses the same names) plus ``spiece_model``: the SentencePiece model's bytes as a uint8 tensor, which
  ComfyUI's umt5 tokenizer reads (comfy/text_encoders/wan.py, comfy/sd.py load_text_encoder_state_dicts). The
  weights load strictly into transformers' UMT5EncoderModel -- the class the Wan diffusers folders ship in
  text_encoder/ -- with the shipped umt5-xxl facts (trainer/configs/umt5_xxl/) and the widths, layer and head
  counts read from the shapes (UMT5 has a relative-attention table in every block: [buckets, heads]).
  The tokenizer is transformers' T5Tokenizer over the file's SentencePiece model with the release's 300 sentinel
  tokens: the same class and vocabulary as the folders' tokenizer/ (google/umt5-xxl's), so the ids are the
  folder's; for ordinary text they are also ComfyUI's (SentencePiece itself). They differ from ComfyUI's only
  where the folder's do too: a literal "<extra_id_N>" is a sentinel token, and transformers' T5Tokenizer gives
  characters outside the vocabulary id 2 where SentencePiece gives umt5's <unk> (3). A file without
  ``spiece_model`` takes the tokenizer of ``model.encoders_from``.
- ``model.image_encoder_file`` (Wan 2.1 I2V): CLIP ViT-H/14's vision tower from models/clip_vision
  (``clip_vision_h.safetensors``), under transformers' CLIPVisionModelWithProjection names (``vision_model.*``
  and ``visual_projection.weight``, as comfy/clip_vision.py loads it), into transformers' CLIPVisionModel (the
  folders' image_encoder/; the projection is not used: Wan takes hidden_states[-2]) in float32, with the Wan I2V
  release's image processor (trainer/configs/wan21_i2v/image_processor).

Each file's kind is checked from its header first (`check_text_encoder_file` / `check_image_encoder_file`), so
a wrong file is a JobError naming the job field before anything loads.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import torch

from ...errors import JobError, ModelError
from .common import CONFIG_DIR, _read_tensors, assign_strictly, read_shapes

UMT5_DIR = CONFIG_DIR / "umt5_xxl"
CLIP_VISION_H_DIR = CONFIG_DIR / "clip_vision_h"
TEXT_FIELD = "model.text_encoder_file"
IMAGE_FIELD = "model.image_encoder_file"
SPIECE_KEY = "spiece_model"  # ComfyUI's name for the SentencePiece model bytes inside a text-encoder file
UMT5_FILES = "models/text_encoders: umt5_xxl_fp16.safetensors or umt5_xxl_fp8_e4m3fn_scaled.safetensors"
CLIP_VISION_FILES = "models/clip_vision: clip_vision_h.safetensors"
_T5_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.")
_CLIP_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
_VISION_PREFIX = "vision_model."
# CLIPVisionModelWithProjection's projection (Wan reads hidden_states[-2]) and the position-id buffer older
# transformers versions saved (0..n-1, not a weight)
_UNUSED_VISION_KEYS = ("visual_projection.weight", "vision_model.embeddings.position_ids")


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _shapes(path, field: str) -> dict:
    try:
        return read_shapes(Path(path).expanduser())
    except ModelError as e:  # missing, not safetensors, unsupported quantization: say which job field
        raise JobError(field, str(e)) from e


def describe_file(shapes: dict) -> str:
    """What a .safetensors file holds, in words, for the errors that refuse it as the wrong kind."""
    keys = set(shapes)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("text_model.encoder.layers.") or has("transformer.resblocks."):
        width = next((v[0] for k, v in shapes.items() if k.endswith("layers.0.layer_norm1.weight")), None)
        name = {768: "CLIP-L (clip_l)", 1024: "CLIP-H", 1280: "CLIP-G (clip_g)"}.get(width, "CLIP")
        return f"a {name} text encoder (text_model.*), as SD / SDXL / Flux use"
    if has("vision_model.") or has("visual."):
        return "a CLIP vision model (vision_model.*), from models/clip_vision"
    t5 = umt5_facts_from_shapes(shapes)
    if t5 is not None and t5["umt5"]:
        return "a umt5 text encoder, from models/text_encoders"
    if t5 is not None:
        return ("a T5 encoder with relative attention in its first block only (t5xxl, as Flux / SD3 use), not "
                "umt5, whose every block has its own")
    if has("model.layers.") or has("layers.0."):
        return "a decoder-only language model (model.layers.*), e.g. a Qwen / Llama / Gemma text encoder"
    if has("patch_embedding.") or has("model.diffusion_model.") or has("double_blocks."):
        return "a diffusion model (models/diffusion_models or models/checkpoints)"
    if has("decoder.") and has("encoder.") and not has("encoder.block."):
        return "a VAE (models/vae)"
    return f"none of the known encoder files (its {len(keys)} tensors, e.g. {', '.join(sorted(keys)[:4])})"


# ---------------------------------------------------------------------------------------------- umt5


def umt5_facts_from_shapes(shapes: dict) -> dict | None:
    """The UMT5 encoder facts a T5-named state dict shows, or None when it is no T5 encoder. `umt5` is False for
    a T5 with relative attention in block 0 only (ComfyUI's t5xxl files)."""
    layers = {int(m.group(1)) for k in shapes if (m := _T5_BLOCK.match(k))}
    shared = shapes.get("shared.weight") or shapes.get("encoder.embed_tokens.weight")
    if not layers or shared is None:
        return None
    rel = [shapes.get(f"encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight") for i in layers]
    q = shapes.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    wi_0 = shapes.get("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    if rel[0] is None or q is None:
        return None
    return {"umt5": all(r is not None for r in rel), "gated": wi_0 is not None, "d_model": shared[1],
            "vocab_size": shared[0], "num_layers": max(layers) + 1, "num_heads": rel[0][1],
            "relative_attention_num_buckets": rel[0][0], "d_kv": q[0] // rel[0][1],
            "d_ff": wi_0[0] if wi_0 is not None else None, "blocks": len(layers)}


def check_text_encoder_file(path, *, text_dim: int | None = None, tokenizer_from=None, need_tokenizer: bool = True,
                            field: str = TEXT_FIELD) -> dict:
    """The umt5 facts of a text-encoder file, from its header alone. JobError naming `field` when it is another
    kind of file, does not fit a transformer with `text_dim`, or (`need_tokenizer`) has no tokenizer and
    `tokenizer_from` gives none either."""
    shapes = _shapes(path, field)
    facts = umt5_facts_from_shapes(shapes)
    if facts is None or not facts["umt5"] or not facts["gated"]:
        kind = describe_file(shapes) if facts is None or not facts["umt5"] else \
            "a T5 encoder without the gated feed-forward (T5 v1.0)"
        raise JobError(field, f"{path}: is {kind}; Wan's text encoder is umt5 ({UMT5_FILES})")
    if facts["num_layers"] != facts["blocks"]:
        raise JobError(field, f"{path}: its encoder blocks are not numbered 0..{facts['num_layers'] - 1}; the file "
                              "is incomplete")
    if text_dim is not None and facts["d_model"] != text_dim:
        raise JobError(field, f"{path}: is a umt5 encoder of width {facts['d_model']}, but the diffusion model takes "
                              f"text of width {text_dim} (its text_dim): this text encoder is not the one it was "
                              f"trained with")
    if need_tokenizer and SPIECE_KEY in shapes and not _protobuf_available():
        raise JobError(field, f"{path}: reading its tokenizer ({SPIECE_KEY}) needs the protobuf package, which "
                              "transformers uses to read SentencePiece models: pip install protobuf")
    if need_tokenizer and SPIECE_KEY not in shapes and tokenizer_from is None:
        raise JobError(field, f"{path}: holds no tokenizer (no {SPIECE_KEY} tensor, which ComfyUI's umt5 files carry)"
                              "; give a Wan diffusers folder as model.encoders_from (only its tokenizer/ is read "
                              "for this), or use ComfyUI's umt5_xxl_*.safetensors")
    return facts


def _protobuf_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("google.protobuf") is not None
    except ModuleNotFoundError:  # no google namespace package at all
        return False


def umt5_config(facts: dict):
    """transformers' UMT5Config: the shipped umt5-xxl facts with the sizes a file's shapes show."""
    from transformers import UMT5Config

    config = {k: v for k, v in _json(UMT5_DIR / "config.json").items() if k != "architectures"}
    for key in ("d_model", "d_kv", "d_ff", "num_heads", "num_layers", "vocab_size", "relative_attention_num_buckets"):
        config[key] = facts[key]
    config["num_decoder_layers"] = facts["num_layers"]
    return UMT5Config(**config)


def _keeps_float32(model, dtype: torch.dtype) -> list[str]:
    """The modules transformers' from_pretrained keeps in float32 at `dtype` (UMT5: `wo` in float16), so the file
    loads to the very numbers the folder's from_pretrained(torch_dtype=dtype) gives."""
    if hasattr(model, "_get_dtype_plan"):
        return list(model._get_dtype_plan(dtype))
    return list(model._keep_in_fp32_modules or []) if dtype == torch.float16 else []


def load_umt5_file(path, dtype: torch.dtype, device: torch.device | str = "cpu", *,
                   field: str = TEXT_FIELD):
    """(UMT5EncoderModel with the file's weights in `dtype`, the file's SentencePiece bytes or None). Strict:
    every tensor used, every parameter filled; scaled-fp8 files come out dequantized (quantized.py)."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import UMT5EncoderModel

    path = Path(path).expanduser()
    facts = check_text_encoder_file(path, need_tokenizer=False, field=field)
    shapes = read_shapes(path)
    config = umt5_config(facts)
    with init_empty_weights():
        model = UMT5EncoderModel(config)
    keep = _keeps_float32(model, dtype)
    weights = [k for k in shapes if k != SPIECE_KEY]
    fp32 = [k for k in weights if any(re.search(rf"(^|\.){re.escape(p)}(\.|$)", k) for p in keep)]
    state = _read_tensors(path, {k: k for k in weights if k not in fp32}, dtype)
    state.update(_read_tensors(path, {k: k for k in fp32}, torch.float32))
    # The input embedding is one tensor under two names (tied); ComfyUI's files hold it once, as shared.weight.
    embedding = state.pop("shared.weight", None)
    embedding = embedding if embedding is not None else state.pop("encoder.embed_tokens.weight")
    state["shared.weight"] = state["encoder.embed_tokens.weight"] = embedding
    assign_strictly(path, {"text_encoder": model}, {"text_encoder": state},
                    f"a umt5 encoder ({facts['num_layers']} blocks of width {facts['d_model']}, "
                    f"{facts['num_heads']} heads x {facts['d_kv']}, d_ff {facts['d_ff']})")
    model.encoder.embed_tokens = model.shared  # tied as from_pretrained leaves it
    spiece = None
    if SPIECE_KEY in shapes:
        with safe_open(str(path), framework="pt") as f:
            spiece = f.get_tensor(SPIECE_KEY).numpy().tobytes()
    return model.to(device), spiece


def umt5_tokenizer(spiece: bytes, vocab_rows: int, source="the text encoder file"):
    """transformers' T5Tokenizer over a SentencePiece model, as the Wan folders' tokenizer/ (google/umt5-xxl's):
    the pieces, then the release's sentinel tokens <extra_id_N> (300; as many as the embedding has rows for,
    so a smaller test vocabulary gets fewer)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    facts = _json(UMT5_DIR / "tokenizer_facts.json")
    try:
        pieces = spm.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    except Exception as e:  # sentencepiece raises RuntimeError / OSError for a corrupt proto
        raise ModelError(f"{source}: its {SPIECE_KEY} is not a SentencePiece model ({e})") from e
    if pieces > vocab_rows:
        raise ModelError(f"{source}: its tokenizer has {pieces} pieces, more than the {vocab_rows} rows of the "
                         "encoder's embedding: the tokenizer belongs to another model")
    extra_ids = min(int(facts["extra_ids"]), vocab_rows - pieces)
    # transformers builds a tokenizer from a SentencePiece *file*; the bytes only live for the build
    with tempfile.TemporaryDirectory(prefix="umt5_spiece_") as folder:
        (Path(folder) / "spiece.model").write_bytes(spiece)
        tokenizer = T5Tokenizer.from_pretrained(folder, extra_ids=extra_ids, eos_token=facts["eos_token"],
                                                pad_token=facts["pad_token"], unk_token=facts["unk_token"])
    tokenizer.vocab_file = None  # the temporary file is gone; nothing saves this tokenizer
    return tokenizer


def load_text_encoder_file(path, dtype: torch.dtype, device: torch.device | str = "cpu", *,
                           tokenizer_from=None, text_dim: int | None = None, field: str = TEXT_FIELD):
    """(UMT5EncoderModel, tokenizer) from ComfyUI's umt5 file: what a Wan family's text_encoders / tokenizers
    hold when loaded from a folder. The tokenizer comes from the file's spiece_model, else from the Wan
    diffusers folder `tokenizer_from` (its tokenizer/)."""
    check_text_encoder_file(path, text_dim=text_dim, tokenizer_from=tokenizer_from, field=field)
    encoder, spiece = load_umt5_file(path, dtype, device, field=field)
    if spiece is not None:
        tokenizer = umt5_tokenizer(spiece, encoder.config.vocab_size, source=str(path))
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(Path(tokenizer_from).expanduser()), subfolder="tokenizer")
        except (OSError, ValueError) as e:
            raise ModelError(f"{tokenizer_from}: cannot load the tokenizer for {path} from its tokenizer/: {e}") from e
    return encoder, tokenizer


# ---------------------------------------------------------------------------------------------- CLIP vision


def clip_vision_facts_from_shapes(shapes: dict) -> dict | None:
    """The CLIP vision tower facts (keys without the vision_model. prefix), or None when it is no CLIP tower."""
    patch = shapes.get("embeddings.patch_embedding.weight")  # [width, 3, p, p]
    positions = shapes.get("embeddings.position_embedding.weight")  # [1 + (size / p)^2, width]
    layers = {int(m.group(1)) for k in shapes if (m := _CLIP_LAYER.match(k))}
    fc1 = shapes.get("encoder.layers.0.mlp.fc1.weight")
    if patch is None or positions is None or not layers or fc1 is None or "embeddings.class_embedding" not in shapes:
        return None
    side = math.isqrt(positions[0] - 1)
    return {"hidden_size": patch[0], "num_hidden_layers": max(layers) + 1, "intermediate_size": fc1[0],
            "patch_size": patch[-1], "image_size": side * patch[-1] if side * side == positions[0] - 1 else None,
            "pre_layrnorm": "pre_layrnorm.weight" in shapes}


def _vision_names(shapes: dict) -> dict[str, str]:
    """{CLIPVisionModel key: file key} for a file under CLIPVisionModel(WithProjection) names."""
    return {k[len(_VISION_PREFIX):]: k for k in shapes if k.startswith(_VISION_PREFIX)}


def check_image_encoder_file(path, *, image_dim: int | None = None, field: str = IMAGE_FIELD) -> dict:
    """The CLIP vision facts of an image-encoder file, from its header alone; JobError naming `field` when it
    is another kind of file or not the ViT-H tower a Wan 2.1 I2V transformer with `image_dim` takes."""
    from ...comfy_encoders.wan_image import processor_input_size, wan_image_processor

    shapes = _shapes(path, field)
    if any(k.startswith("visual.transformer.") for k in shapes):
        raise JobError(field, f"{path}: is a CLIP vision tower in open_clip's layout (visual.transformer.*); use "
                              f"ComfyUI's repackaged file under transformers' names ({CLIP_VISION_FILES})")
    names = _vision_names(shapes)
    facts = clip_vision_facts_from_shapes({k: shapes[v] for k, v in names.items()})
    if facts is None or not facts["pre_layrnorm"]:
        kind = describe_file(shapes) if facts is None and not names else \
            "a vision model that is not a CLIP tower (no class embedding / pre-layernorm: e.g. SigLIP or DINOv2)"
        raise JobError(field, f"{path}: is {kind}; Wan 2.1 I2V's image encoder is CLIP ViT-H/14 ({CLIP_VISION_FILES})")
    height, width = processor_input_size(wan_image_processor())
    head = _clip_head_width()
    problems = []
    if facts["image_size"] != height or height != width:
        problems.append(f"it takes {facts['image_size']}-pixel images, Wan 2.1 I2V's CLIP {height}x{width}")
    if facts["hidden_size"] % head:
        problems.append(f"its width {facts['hidden_size']} is not a multiple of ViT-H's head width {head}")
    if image_dim is not None and facts["hidden_size"] != image_dim:
        problems.append(f"its width is {facts['hidden_size']}, the diffusion model's image_dim {image_dim}")
    if problems:
        raise JobError(field, f"{path}: is not the CLIP ViT-H vision tower this Wan 2.1 I2V model takes ("
                              f"{CLIP_VISION_FILES}): " + "; ".join(problems))
    return facts


def _clip_head_width() -> int:
    config = _json(CLIP_VISION_H_DIR / "config.json")
    return config["hidden_size"] // config["num_attention_heads"]


def clip_vision_config(facts: dict):
    """transformers' CLIPVisionConfig: the shipped ViT-H/14 facts with the sizes a file's shapes show (heads of
    ViT-H's width 80, which shapes cannot show)."""
    from transformers import CLIPVisionConfig

    config = {k: v for k, v in _json(CLIP_VISION_H_DIR / "config.json").items() if k != "architectures"}
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "patch_size", "image_size"):
        config[key] = facts[key]
    config["num_attention_heads"] = facts["hidden_size"] // _clip_head_width()
    return CLIPVisionConfig(**config)


def load_clip_vision_file(path, device: torch.device | str = "cpu", *, image_dim: int | None = None,
                          field: str = IMAGE_FIELD):
    """CLIPVisionModel (float32, as the family loads a folder's image_encoder: it runs once per item, then is
    cached) from ComfyUI's clip_vision_h file. Strict, except the unused visual projection."""
    from accelerate import init_empty_weights
    from transformers import CLIPVisionModel

    path = Path(path).expanduser()
    facts = check_image_encoder_file(path, image_dim=image_dim, field=field)
    shapes = read_shapes(path)
    names = {k: v for k, v in _vision_names(shapes).items() if v not in _UNUSED_VISION_KEYS}
    left_over = [k for k in shapes if k not in names.values() and k not in _UNUSED_VISION_KEYS]
    with init_empty_weights():
        model = CLIPVisionModel(clip_vision_config(facts))
    # transformers 5 names CLIPVisionModel's weights without the vision_model. prefix (4.x with it)
    prefixed = any(k.startswith(_VISION_PREFIX) for k in model.state_dict())
    state = {(_VISION_PREFIX + k if prefixed else k): v for k, v in _read_tensors(path, names, torch.float32).items()}
    assign_strictly(path, {"image_encoder": model}, {"image_encoder": state},
                    f"a CLIP vision tower ({facts['num_hidden_layers']} layers of width {facts['hidden_size']})",
                    left_over=left_over)
    return model.to(device)


def attach_image_encoder_file(path, family, *, field: str = IMAGE_FIELD) -> None:
    """Give a Wan 2.1 I2V family the file's CLIP vision tower and the release's image processor, where
    wan21_i2v.load_image_encoder puts a folder's."""
    from ...comfy_encoders.wan_image import wan_image_processor

    image_dim = getattr(family.denoiser.config, "image_dim", None)
    encoder = load_clip_vision_file(path, family.denoiser.device, image_dim=image_dim, field=field)
    family.loaded.extra["image_encoder"] = encoder
    family.loaded.extra["image_processor"] = wan_image_processor()
