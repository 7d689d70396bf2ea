"""A Wan job from ComfyUI-format files only (no diffusers folder): the diffusion-model file, ComfyUI's umt5 text
encoder file (models/text_encoders, with its spiece_model tokenizer), the Wan 2.1 VAE file and, for Wan 2.1 I2V,
the CLIP vision file (models/clip_vision). Each encoder must give exactly what the diffusers folder of the same
weights gives, and a job file of files alone must train to the folder's loss curve."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from family_helpers import native_state_dict
from fixtures_models import tiny_wan21_i2v_path, tiny_wan21_path  # noqa: F401
from tests.e2e.tiny_text_encoder import train_sentencepiece
from tests.media import textured_frames, write_caption, write_video
from test_single_file_fp8 import write_scaled
from trainer.errors import JobError, ModelError
from trainer.families import get_family
from trainer.families.single_file import load_single_file
from trainer.families.single_file.encoder_files import (
    load_clip_vision_file,
    load_text_encoder_file,
    umt5_tokenizer,
)
from trainer.families.single_file.quantized import LEGACY
from trainer.job import load_job, parse_job
from trainer.loop import train

SENTINELS = 8  # the tiny vocabulary's <extra_id_N> (the release has 300)
CLIP_WIDTH = 160  # two heads of ViT-H's width 80
CAPTIONS = ["a red fox jumps over the lazy dog", "  two  spaces, trailing ", "Ünïcödé ЖЖ 猫 🦊 (weird) [x]",
            "tabs\tand\nnewlines", "", "a cat sitting on a windowsill at sunset " * 40]


# ---------------------------------------------------------------------------------------------- tiny files


def tiny_umt5(vocab: int, seed: int = 3, d_model: int = 32):
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UMT5EncoderModel(UMT5Config(
            vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0)).eval()


def umt5_file_tensors(model, spiece: bytes | None) -> dict:
    """ComfyUI's umt5 file layout: the encoder under T5 names with the embedding once (shared.weight), plus the
    SentencePiece model as a uint8 tensor."""
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
               if k != "encoder.embed_tokens.weight"}
    if spiece is not None:
        tensors["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8).clone()
    return tensors


def folder_tokenizer(spiece: bytes, out, tmp):
    """The folders' tokenizer/ as google/umt5-xxl ships it: a T5Tokenizer saved with its tokenizer.json."""
    from transformers import T5Tokenizer

    (tmp / "spiece").mkdir(parents=True, exist_ok=True)
    (tmp / "spiece" / "spiece.model").write_bytes(spiece)
    T5Tokenizer.from_pretrained(str(tmp / "spiece"), extra_ids=SENTINELS).save_pretrained(str(out))


def wan21_vae_native(vae) -> dict:
    """A diffusers Wan 2.1 AutoencoderKLWan state dict under Wan's / ComfyUI's names (models/vae): the inverse of
    diffusers' convert_wan_vae_to_diffusers, found by converting every native name the architecture can have."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    parts = [f"residual.{i}.{p}" for i, p in ((0, "gamma"), (2, "weight"), (2, "bias"), (3, "gamma"), (6, "weight"),
                                              (6, "bias"))]
    parts += [f"{m}.{p}" for m in ("shortcut", "resample.1", "time_conv") for p in ("weight", "bias")]
    names = [f"{side}.{blocks}.{i}.{p}" for side, blocks in (("encoder", "downsamples"), ("decoder", "upsamples"))
             for i in range(16) for p in parts]
    for side in ("encoder", "decoder"):
        names += [f"{side}.middle.{i}.{p}" for i in (0, 2) for p in parts[:6]]
        names += [f"{side}.middle.1.{p}" for p in ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight",
                                                    "proj.bias")]
        names += [f"{side}.head.0.gamma", f"{side}.head.2.weight", f"{side}.head.2.bias", f"{side}.conv1.weight",
                  f"{side}.conv1.bias"]
    names += ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]
    inverse = {diffusers: native for diffusers, native in convert_wan_vae_to_diffusers({n: n for n in names}).items()}
    state = vae.state_dict()
    missing = [k for k in state if k not in inverse]
    assert not missing, missing[:3]
    return {inverse[k]: v.detach().clone().contiguous() for k, v in state.items()}


def tiny_clip_vision(seed: int = 4):
    """CLIP ViT-H/14's vision tower at width 160 (2 heads of 80), 2 layers, 224-pixel images in 14-pixel patches."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=CLIP_WIDTH, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2, image_size=224, patch_size=14, projection_dim=32,
                              hidden_act="gelu", layer_norm_eps=1e-5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(config).eval(), config


def _edit_index(folder, **entries):
    index = json.loads((folder / "model_index.json").read_text())
    index.update(entries)
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))


@pytest.fixture(scope="module")
def spiece():
    return train_sentencepiece()


@pytest.fixture(scope="module")
def t2v(tiny_wan21_path, spiece, tmp_path_factory):
    """A Wan 2.1 T2V diffusers folder (umt5 + SentencePiece tokenizer, a Wan 2.1-architecture VAE) and the same
    weights as ComfyUI files: transformer, umt5 (+ spiece_model), VAE; plus the transformer's config alone."""
    import sentencepiece as spm
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    root = tmp_path_factory.mktemp("enc_t2v")
    folder = root / "folder"
    shutil.copytree(tiny_wan21_path, folder)
    vocab = spm.SentencePieceProcessor(model_proto=spiece).get_piece_size() + SENTINELS
    text_encoder = tiny_umt5(vocab)
    for part in ("text_encoder", "tokenizer", "vae"):
        shutil.rmtree(folder / part)
    text_encoder.save_pretrained(str(folder / "text_encoder"))
    folder_tokenizer(spiece, folder / "tokenizer", root)
    _edit_index(folder, tokenizer=["transformers", "T5Tokenizer"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        vae = AutoencoderKLWan(base_dim=8)  # the Wan 2.1 VAE architecture (what a models/vae file holds), narrow
    vae.save_pretrained(str(folder / "vae"))
    transformer = WanTransformer3DModel.from_pretrained(str(folder), subfolder="transformer")
    files = {"transformer": root / "tiny_wan.safetensors", "text": root / "umt5_tiny.safetensors",
             "vae": root / "wan_vae_tiny.safetensors", "config": root / "tiny_wan_config.json",
             "text_no_spiece": root / "umt5_tiny_no_spiece.safetensors"}
    save_file(native_state_dict(transformer), str(files["transformer"]))
    save_file(umt5_file_tensors(text_encoder, spiece), str(files["text"]))
    save_file(umt5_file_tensors(text_encoder, None), str(files["text_no_spiece"]))
    save_file(wan21_vae_native(vae), str(files["vae"]))
    shutil.copy(folder / "transformer" / "config.json", files["config"])
    return {"folder": folder, "text_encoder": text_encoder, **files}


@pytest.fixture(scope="module")
def i2v(tiny_wan21_i2v_path, t2v, tmp_path_factory):
    """The same for Wan 2.1 I2V: a transformer taking CLIP embeddings of width 160, the CLIP vision file."""
    from diffusers import WanTransformer3DModel
    from transformers import CLIPVisionModel

    from trainer.comfy_encoders.wan_image import WAN_I2V_IMAGE_PROCESSOR

    root = tmp_path_factory.mktemp("enc_i2v")
    folder = root / "folder"
    shutil.copytree(tiny_wan21_i2v_path, folder)
    for part in ("transformer", "text_encoder", "tokenizer", "vae", "image_encoder", "image_processor"):
        shutil.rmtree(folder / part)
    for part in ("text_encoder", "tokenizer", "vae"):
        shutil.copytree(t2v["folder"] / part, folder / part)
    _edit_index(folder, tokenizer=["transformers", "T5Tokenizer"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=CLIP_WIDTH, added_kv_proj_dim=24)
    transformer.save_pretrained(str(folder / "transformer"))
    full, config = tiny_clip_vision()
    encoder = CLIPVisionModel(config)
    missing, unexpected = encoder.load_state_dict({k.removeprefix("vision_model."): v for k, v in full.state_dict().items()
                                                   if k.startswith("vision_model.")}, strict=False)
    assert not missing and not unexpected
    encoder.save_pretrained(str(folder / "image_encoder"))
    shutil.copytree(WAN_I2V_IMAGE_PROCESSOR, folder / "image_processor")
    files = {"transformer": root / "tiny_wan_i2v.safetensors", "image": root / "clip_vision_h_tiny.safetensors",
             "config": root / "tiny_wan_i2v_config.json"}
    save_file(native_state_dict(transformer, "model.diffusion_model."), str(files["transformer"]))
    save_file({k: v.detach().clone().contiguous() for k, v in full.state_dict().items()}, str(files["image"]))
    shutil.copy(folder / "transformer" / "config.json", files["config"])
    return {"folder": folder, "text": t2v["text"], "vae": t2v["vae"], "clip": full, **files}


def files_family(files, dtype=torch.float32, **kw):
    return load_single_file(files["transformer"], dtype, config=files["config"], text_encoder_file=files["text"],
                            vae_file=files["vae"], **kw)


# ---------------------------------------------------------------------------------------------- released sizes


def test_released_file_shapes_give_the_released_architectures(tmp_path):
    """Header-only files with the shapes of ComfyUI's umt5_xxl_fp16 (11.4 GB: 5.7e9 parameters) and clip_vision_h
    (1.26 GB: 6.3e8) give back the release's configs: heads, widths and layers read from the shapes."""
    from accelerate import init_empty_weights
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, UMT5Config, UMT5EncoderModel

    from family_helpers import header_only_file
    from trainer.families.single_file.encoder_files import (
        CLIP_VISION_H_DIR,
        UMT5_DIR,
        check_image_encoder_file,
        check_text_encoder_file,
        clip_vision_config,
        umt5_config,
    )

    released = json.loads((UMT5_DIR / "config.json").read_text())
    with init_empty_weights():
        umt5 = UMT5EncoderModel(UMT5Config(**{k: v for k, v in released.items() if k != "architectures"}))
    shapes = {k: tuple(v.shape) for k, v in umt5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert 5.5e9 < sum(math.prod(s) for s in shapes.values()) < 5.9e9
    te = tmp_path / "umt5_xxl_fp16.safetensors"
    header_only_file(te, {**shapes, "spiece_model": (4_548_313,)})
    facts = check_text_encoder_file(te, text_dim=4096)
    assert umt5_config(facts).to_dict() == umt5.config.to_dict()
    clip_released = json.loads((CLIP_VISION_H_DIR / "config.json").read_text())
    with init_empty_weights():
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**{k: v for k, v in clip_released.items()
                                                                 if k != "architectures"}))
    shapes = {k: tuple(v.shape) for k, v in clip.state_dict().items()}
    assert 6.2e8 < sum(math.prod(s) for s in shapes.values()) < 6.4e8
    ie = tmp_path / "clip_vision_h.safetensors"
    header_only_file(ie, {**shapes, "vision_model.embeddings.position_ids": (1, 257)})
    config = clip_vision_config(check_image_encoder_file(ie, image_dim=1280))
    assert config.to_dict() == clip.config.to_dict()
    assert (config.num_attention_heads, config.hidden_size, config.num_hidden_layers) == (16, 1280, 32)


# ---------------------------------------------------------------------------------------------- text encoder


def test_umt5_file_loads_the_folders_encoder_exactly(t2v):
    from transformers import UMT5EncoderModel

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        encoder, _ = load_text_encoder_file(t2v["text"], dtype)
        reference = UMT5EncoderModel.from_pretrained(str(t2v["folder"]), subfolder="text_encoder", torch_dtype=dtype)
        got, want = encoder.state_dict(), reference.state_dict()
        assert set(got) == set(want)
        for k in want:  # dtypes too: from_pretrained keeps UMT5's `wo` in float32 at float16
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (dtype, k)
        assert encoder.shared.weight is encoder.encoder.embed_tokens.weight
        assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
        for key in ("d_model", "d_kv", "d_ff", "num_heads", "num_layers", "vocab_size", "dense_act_fn",
                    "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon"):
            assert getattr(encoder.config, key) == getattr(reference.config, key), key


def test_tokenizer_from_spiece_model_is_the_folders_and_sentencepieces(t2v, spiece):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    _, ours = load_text_encoder_file(t2v["text"], torch.float32)
    folder = AutoTokenizer.from_pretrained(str(t2v["folder"]), subfolder="tokenizer")  # as Wan21.load reads it
    comfy = spm.SentencePieceProcessor(model_proto=spiece, add_bos=False, add_eos=True)  # = ComfyUI's SPieceTokenizer
    for caption in CAPTIONS:
        ids = ours(caption).input_ids
        assert ids == folder(caption).input_ids == comfy.encode(caption), caption
        padded = ours(caption, padding="max_length", max_length=512, truncation=True).input_ids
        assert padded == folder(caption, padding="max_length", max_length=512, truncation=True).input_ids
    assert ours.pad_token_id == 0 and ours.eos_token_id == 1 and len(ours) == len(folder)
    # the release's sentinels are special tokens in the folder's tokenizer and ours (SentencePiece splits them)
    assert ours("x <extra_id_0>").input_ids == folder("x <extra_id_0>").input_ids
    assert ours.convert_tokens_to_ids("<extra_id_0>") == len(ours) - 1
    # the real vocabulary: 256000 pieces + 300 sentinels inside 256384 rows; a smaller table gets fewer
    assert len(umt5_tokenizer(spiece, len(ours) - 3)) == len(ours) - 3


def test_tokenizer_with_umt5s_own_special_ids(tmp_path):
    """umt5's SentencePiece model numbers <pad> 0, </s> 1, <s> 2, <unk> 3 (the tiny one above has no <s>)."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    from tests.e2e.tiny_text_encoder import CORPUS

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=80,
                                   model_type="unigram", pad_id=0, eos_id=1, bos_id=2, unk_id=3, num_threads=1,
                                   character_coverage=1.0, minloglevel=2, hard_vocab_limit=False)
    proto = buf.getvalue()
    pieces = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    ours = umt5_tokenizer(proto, pieces + SENTINELS)
    folder_tokenizer(proto, tmp_path / "tokenizer", tmp_path)
    folder = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    comfy = spm.SentencePieceProcessor(model_proto=proto, add_bos=False, add_eos=True)
    for caption in CAPTIONS:
        assert ours(caption).input_ids == folder(caption).input_ids, caption
    # characters outside the vocabulary aside (transformers' T5Tokenizer maps them to id 2 in both, SentencePiece
    # to <unk>), the ids are ComfyUI's too
    for caption in (CAPTIONS[0], CAPTIONS[1], CAPTIONS[5], "the quick brown fox, cinematic lighting"):
        assert ours(caption).input_ids == comfy.encode(caption), caption


def test_text_encoding_equals_the_folders(t2v):
    captions = ["waves rolling", "  A Red   fox, (1.2) <b>x</b>  ", ""]
    for dtype in (torch.float32, torch.bfloat16):
        family = get_family("wan21").load(str(t2v["folder"]), dtype)
        files = files_family(t2v, dtype)
        assert files.loaded.text_encoders[0].dtype == dtype
        for a, b in zip(family.encode_prompts(captions), files.encode_prompts(captions)):
            assert torch.equal(a["encoder_hidden_states"], b["encoder_hidden_states"])  # bit-exact


def test_file_without_spiece_model_takes_the_folder_tokenizer(t2v):
    from transformers import AutoTokenizer

    _, tokenizer = load_text_encoder_file(t2v["text_no_spiece"], torch.float32, tokenizer_from=t2v["folder"])
    folder = AutoTokenizer.from_pretrained(str(t2v["folder"]), subfolder="tokenizer")
    assert tokenizer(CAPTIONS[0]).input_ids == folder(CAPTIONS[0]).input_ids
    family = load_single_file(t2v["transformer"], torch.float32, config=t2v["config"],
                              text_encoder_file=t2v["text_no_spiece"], encoders_from=t2v["folder"])
    assert family.loaded.text_encoders[0].config.d_model == 32


def test_scaled_fp8_umt5_file_loads_dequantized(t2v, tmp_path):
    """umt5_xxl_fp8_e4m3fn_scaled.safetensors: the blocks' Linear weights as float8 with one scale each."""
    tensors = umt5_file_tensors(t2v["text_encoder"], None)
    layers = sorted(k[:-len(".weight")] for k, v in tensors.items() if k.startswith("encoder.block.")
                    and k.endswith(".weight") and v.ndim == 2 and "relative_attention_bias" not in k)
    path = tmp_path / "umt5_fp8_scaled.safetensors"
    quantized = write_scaled(path, {**tensors, "spiece_model": torch.zeros(1, dtype=torch.uint8)}, LEGACY,
                             layers=layers)
    path_with_spiece = tmp_path / "umt5_fp8_scaled_real_spiece.safetensors"
    from safetensors.torch import load_file

    fp8 = load_file(str(path))
    fp8["spiece_model"] = umt5_file_tensors(t2v["text_encoder"], train_sentencepiece())["spiece_model"]
    save_file(fp8, str(path_with_spiece))
    encoder, tokenizer = load_text_encoder_file(path_with_spiece, torch.bfloat16)
    state = encoder.state_dict()
    for key, (q, scale) in quantized.items():
        assert torch.equal(state[key], q.to(torch.bfloat16) * scale.to(torch.bfloat16)), key
    assert torch.equal(state["shared.weight"], t2v["text_encoder"].shared.weight.to(torch.bfloat16))
    assert tokenizer("waves").input_ids[-1] == 1


# ---------------------------------------------------------------------------------------------- image encoder


def test_clip_vision_file_loads_the_folders_image_encoder_exactly(i2v, tmp_path):
    from transformers import CLIPVisionModel

    encoder = load_clip_vision_file(i2v["image"], image_dim=CLIP_WIDTH)
    reference = CLIPVisionModel.from_pretrained(str(i2v["folder"]), subfolder="image_encoder",
                                                torch_dtype=torch.float32)
    got, want = encoder.state_dict(), reference.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                "image_size", "hidden_act", "layer_norm_eps"):
        assert getattr(encoder.config, key) == getattr(reference.config, key), key
    # older transformers saved the position ids buffer too: not a weight, read past
    with_ids = tmp_path / "clip_vision_h_position_ids.safetensors"
    save_file({**i2v["clip"].state_dict(), "vision_model.embeddings.position_ids": torch.arange(257)[None]},
              str(with_ids))
    again = load_clip_vision_file(with_ids).state_dict()
    assert all(torch.equal(again[k], want[k]) for k in want)
    broken = tmp_path / "clip_vision_extra.safetensors"
    save_file({**i2v["clip"].state_dict(), "vision_model.encoder.layers.0.extra.weight": torch.ones(2)}, str(broken))
    with pytest.raises(ModelError, match="do not fill a CLIP vision tower.*unexpected.*extra.weight"):
        load_clip_vision_file(broken)


def test_image_and_text_encodings_equal_the_folders(i2v):
    folder = get_family("wan21_i2v").load(str(i2v["folder"]), torch.float32)
    files = files_family(i2v, image_encoder_file=i2v["image"])
    assert files.name == "wan21_i2v" and files.uses_clip
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 5, 32, 48) * 2 - 1
    a, b = folder.encode_pixels(pixels), files.encode_pixels(pixels)
    assert set(a) == set(b) == {"latents", "image_condition", "image_embeds"}
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-exact
    assert a["image_embeds"].shape == (2, 257, CLIP_WIDTH)
    for x, y in zip(folder.encode_prompts(["a fox"]), files.encode_prompts(["a fox"])):
        assert torch.equal(x["encoder_hidden_states"], y["encoder_hidden_states"])


# ---------------------------------------------------------------------------------------------- job files


def write_data(root):
    data = root / "clips"
    write_video(data / "clip.mp4", textured_frames(8, 32, 32), num_frames=8, width=32, height=32, gop=4)
    write_caption(data / "clip.mp4", "waves rolling")
    return data


def run_job(root, name, family, model: dict, data, steps=4):
    doc = {"job": name, "output_dir": str(root / name), "model": {"family": family, "dtype": "fp32", **model},
           "datasets": [{"folder_path": str(data), "resolution": [32], "num_frames": 5}],
           "network": {"linear": 4, "linear_alpha": 4},
           "train": {"steps": steps, "batch_size": 1, "lr": 1e-3, "seed": 5},
           "save": {"every": 100, "resume": "none"}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return train(load_job(path))  # what `python -m trainer run JOB.yaml` does


def test_job_of_comfyui_files_only_trains_as_the_folder(t2v, tmp_path):
    data = write_data(tmp_path)
    folder_run = run_job(tmp_path, "folder", "wan21", {"path": str(t2v["folder"])}, data)
    model = {"path": str(t2v["transformer"]), "config": str(t2v["config"]), "text_encoder_file": str(t2v["text"]),
             "vae_file": str(t2v["vae"])}
    files_run = run_job(tmp_path, "files", "wan21", model, data)
    losses = [r["loss"] for r in folder_run.records]
    assert len(losses) == 4 and [r["loss"] for r in files_run.records] == losses  # bit-exact on the same weights
    for k, v in folder_run.lora_state.items():
        assert torch.equal(v, files_run.lora_state[k]), k


def test_i2v_job_of_comfyui_files_only_trains_as_the_folder(i2v, tmp_path):
    data = write_data(tmp_path)
    folder_run = run_job(tmp_path, "folder", "wan21_i2v", {"path": str(i2v["folder"])}, data, steps=3)
    model = {"path": str(i2v["transformer"]), "config": str(i2v["config"]), "text_encoder_file": str(i2v["text"]),
             "vae_file": str(i2v["vae"]), "image_encoder_file": str(i2v["image"])}
    files_run = run_job(tmp_path, "files", "wan21_i2v", model, data, steps=3)
    assert [r["loss"] for r in files_run.records] == [r["loss"] for r in folder_run.records]


def test_wan22_a14b_takes_the_umt5_file(t2v, tmp_path):
    from diffusers import WanTransformer3DModel

    high, low = tmp_path / "wan2.2_t2v_high_noise_tiny.safetensors", tmp_path / "wan2.2_t2v_low_noise_tiny.safetensors"
    for seed, path in ((7, high), (8, low)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            config = json.loads(t2v["config"].read_text())
            model = WanTransformer3DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        save_file(native_state_dict(model), str(path))
    family = load_single_file(high, torch.float32, config=t2v["config"], family="wan22_14b", low_noise_path=low,
                              text_encoder_file=t2v["text"], vae_file=t2v["vae"])
    reference = files_family(t2v)
    assert family.name == "wan22_14b"
    assert torch.equal(family.encode_prompts(["a fox"])[0]["encoder_hidden_states"],
                       reference.encode_prompts(["a fox"])[0]["encoder_hidden_states"])


# ---------------------------------------------------------------------------------------------- refusals


@pytest.fixture
def no_transformer_load(monkeypatch):
    """Fail the test if a diffusion model starts loading: the refusals must come from the headers first."""
    from trainer.families.single_file import wan

    def refuse(*a, **k):
        raise AssertionError("the transformer started loading before the encoder files were checked")

    monkeypatch.setattr(wan, "load_wan_transformer", refuse)


def _refused(field, match, **kwargs):
    with pytest.raises(JobError, match=match) as err:
        load_single_file(**kwargs)
    assert err.value.field == field and field in str(err.value)
    return err.value


def test_wrong_encoder_files_name_the_field_before_loading(t2v, i2v, tmp_path, no_transformer_load, monkeypatch):
    clip_l = tmp_path / "clip_l.safetensors"
    save_file({"text_model.encoder.layers.0.layer_norm1.weight": torch.ones(768),
               "text_model.embeddings.token_embedding.weight": torch.zeros(8, 768)}, str(clip_l))
    t5xxl = tmp_path / "t5xxl_fp16.safetensors"  # relative attention in block 0 only (Flux / SD3's T5)
    t5 = umt5_file_tensors(t2v["text_encoder"], None)
    save_file({k: v for k, v in t5.items() if "block.1.layer.0.SelfAttention.relative_attention_bias" not in k},
              str(t5xxl))
    base = {"path": t2v["transformer"], "dtype": torch.float32, "config": t2v["config"], "vae_file": t2v["vae"]}
    _refused("model.text_encoder_file", "CLIP-L.*Wan's text encoder is umt5", text_encoder_file=clip_l, **base)
    _refused("model.text_encoder_file", "t5xxl.*not umt5", text_encoder_file=t5xxl, **base)
    _refused("model.text_encoder_file", "is a CLIP vision model", text_encoder_file=i2v["image"], **base)
    _refused("model.text_encoder_file", "no such file", text_encoder_file=tmp_path / "absent.safetensors", **base)
    _refused("model.text_encoder_file", "holds no tokenizer.*encoders_from", text_encoder_file=t2v["text_no_spiece"],
             **base)
    wide = tmp_path / "umt5_wide.safetensors"
    save_file(umt5_file_tensors(tiny_umt5(88, d_model=48), None), str(wide))
    _refused("model.text_encoder_file", r"width 48.*width 32 \(its text_dim\)", text_encoder_file=wide, **base)
    i2v_base = {"path": i2v["transformer"], "dtype": torch.float32, "config": i2v["config"], "vae_file": i2v["vae"],
                "text_encoder_file": i2v["text"]}
    _refused("model.image_encoder_file", "umt5 text encoder.*CLIP ViT-H", image_encoder_file=i2v["text"], **i2v_base)
    narrow, _ = tiny_clip_vision()
    odd = tmp_path / "clip_vision_336.safetensors"
    state = {k: v for k, v in narrow.state_dict().items()}
    state["vision_model.embeddings.position_embedding.weight"] = torch.zeros(577, CLIP_WIDTH)
    save_file(state, str(odd))
    _refused("model.image_encoder_file", "336-pixel images", image_encoder_file=odd, **i2v_base)
    from trainer.families.single_file import encoder_files

    monkeypatch.setattr(encoder_files, "_protobuf_available", lambda: False)  # ComfyUI's own venv lacks it
    _refused("model.text_encoder_file", "needs the protobuf package", text_encoder_file=t2v["text"], **base)


def test_job_file_checks_the_encoder_fields(t2v, i2v, tmp_path):
    def job(family, path, **model):
        return parse_job({"job": "j", "output_dir": str(tmp_path / "out"),
                          "model": {"family": family, "path": str(path), **model},
                          "datasets": [{"folder_path": str(tmp_path)}]})

    parsed = job("wan21_i2v", "rel/model.safetensors", text_encoder_file="te/umt5.safetensors",
                 image_encoder_file="~/clip_vision_h.safetensors")
    assert parsed.model.text_encoder_file.endswith("te/umt5.safetensors") and "~" not in parsed.model.image_encoder_file
    from trainer.job import job_to_dict

    again = job_to_dict(parsed)["model"]
    assert again["text_encoder_file"] == parsed.model.text_encoder_file
    assert "image_encoder_file" not in job_to_dict(job("wan21", "m.safetensors"))["model"]
    for family, path, model, field, match in (
            ("wan21", "m.safetensors", {"image_encoder_file": "c.safetensors"}, "model.image_encoder_file",
             "only for wan21_i2v; wan21 has no image encoder"),
            ("flux", "m.safetensors", {"text_encoder_file": "t.safetensors"}, "model.text_encoder_file",
             "only for wan21 / .*flux does not use umt5"),
            ("wan21", t2v["folder"], {"text_encoder_file": "t.safetensors"}, "model.text_encoder_file",
             "a diffusers folder uses its own encoders"),
            ("wan21", "m.safetensors", {"text_encoder_file": "umt5.pth"}, "model.text_encoder_file",
             "must be a .safetensors file")):
        with pytest.raises(JobError, match=match) as err:
            job(family, path, **model)
        assert err.value.field == field


# ---------------------------------------------------------------------------------------------- real ComfyUI


def test_comfyuis_own_tokenizer_gives_our_ids(t2v):
    """ComfyUI's SPieceTokenizer (what CLIPLoader type=wan tokenizes with) on the file's spiece_model; local check
    with real ComfyUI (COMFYUI_ROOT), skipped in CI."""
    from tests.e2e.comfy_env import require_comfyui

    root, python = require_comfyui()
    script = ("import json, sys\nsys.path.insert(0, '.')\nfrom safetensors.torch import load_file\n"
              "from comfy.text_encoders.spiece_tokenizer import SPieceTokenizer\n"
              "tok = SPieceTokenizer(load_file(sys.argv[1])['spiece_model'])\n"
              "print(json.dumps([tok(c)['input_ids'] for c in json.loads(sys.argv[2])]))\n")
    run = subprocess.run([str(python), "-c", script, str(t2v["text"]), json.dumps(CAPTIONS)], cwd=str(root),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    _, ours = load_text_encoder_file(t2v["text"], torch.float32)
    assert [ours(c).input_ids for c in CAPTIONS] == theirs


def test_comfyuis_own_encoding_of_a_umt5_file_equals_ours(tmp_path):
    """ComfyUI's CLIPLoader (type wan) on a umt5 file, through trainer.comfy_encoders (what the Train node does),
    against the headless path on the same file: model.text_encoder_file -> Wan21.encode_prompts. Local check with
    real ComfyUI (COMFYUI_ROOT), skipped in CI."""
    from tests.e2e.comfy_env import require_comfyui

    root, python = require_comfyui()
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, UMT5EncoderModel

    from tests.e2e.tiny_text_encoder import build_tiny_umt5
    from trainer.families.base import LoadedModel
    from trainer.families.wan21 import Wan21

    text = build_tiny_umt5(tmp_path / "umt5")  # ComfyUI-loadable: 24 blocks x 4096, spiece_model inside
    captions = ["a moving texture number 3", "a (red:1.5) fox \\ jumps, over the [lazy] dog",
                "Zebra ünïcode 漢字  over   the dog", " ".join(["slow motion video of waves"] * 120)]
    (tmp_path / "captions.json").write_text(json.dumps([prompt_clean(c) for c in captions]))
    script = Path(__file__).resolve().parent / "e2e" / "comfy_umt5_encode.py"
    run = subprocess.run([str(python), str(script), str(text["comfy_file"]), str(text["comfy_config"]),
                          str(tmp_path / "captions.json"), str(tmp_path / "comfy.safetensors")], cwd=str(root),
                         capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    comfy = load_file(str(tmp_path / "comfy.safetensors"))

    def family(encoder, tokenizer):
        return Wan21(LoadedModel(denoiser=torch.nn.Identity(), text_encoders=[encoder], tokenizers=[tokenizer],
                                 extra={"max_sequence_length": 512, "dtype": torch.float32}))

    ours = family(*load_text_encoder_file(text["comfy_file"], torch.float32)).encode_prompts(captions)
    folder = family(UMT5EncoderModel.from_pretrained(str(text["text_encoder"])).eval(),
                    AutoTokenizer.from_pretrained(str(text["tokenizer"]))).encode_prompts(captions)
    worst = 0.0
    for i, caption in enumerate(captions):
        a, b = ours[i]["encoder_hidden_states"], comfy[f"h{i}"]
        assert torch.equal(a, folder[i]["encoder_hidden_states"]), caption[:40]
        assert a.shape == b.shape == (512, 4096)
        worst = max(worst, (a - b).abs().max().item())
        assert (a - b).abs().max().item() < 1e-4 * max(1.0, a.abs().max().item()), caption[:40]
    print(f"max |ComfyUI - text_encoder_file| prompt embedding difference {worst:.3e}")


def test_comfyuis_own_clip_vision_of_the_file_equals_ours(tmp_path, monkeypatch):
    """ComfyUI's CLIPVisionLoader on a clip_vision_h-layout file, through the wan21_i2v adapter (the Train node's
    path), against model.image_encoder_file on the same file. Local check with real ComfyUI, skipped in CI."""
    from tests.e2e.comfy_env import require_comfyui

    root, python = require_comfyui()
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    from tests.e2e import tiny_clip_vision
    from tests.e2e.test_comfyui_clip_vision import first_frames
    from trainer.comfy_encoders.wan_image import wan_image_processor
    from trainer.families.base import LoadedModel
    from trainer.families.wan21_i2v import Wan21I2V

    # ComfyUI's ViT-H detection needs 32 layers; two heads of ViT-H's width 80 (the e2e tower's heads are 8 wide)
    monkeypatch.setattr(tiny_clip_vision, "WIDTH", CLIP_WIDTH)
    vision = tiny_clip_vision.build_tiny_clip_vision(tmp_path / "clip_vision")
    images = first_frames()
    save_file({f"image{i}": torch.from_numpy(im) for i, im in enumerate(images)}, str(tmp_path / "frames.safetensors"))
    script = Path(__file__).resolve().parent / "e2e" / "comfy_clip_vision_encode.py"
    run = subprocess.run([str(python), str(script), str(vision["comfy_file"]), str(vision["comfy_config"]),
                          str(tmp_path / "clip_vision"), str(tmp_path / "frames.safetensors"),
                          str(tmp_path / "comfy.safetensors")], cwd=str(root), capture_output=True, text=True,
                         timeout=900, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    comfy = load_file(str(tmp_path / "comfy.safetensors"))

    def embed(encoder):
        family = Wan21I2V(LoadedModel(denoiser=torch.nn.Identity(), extra={
            "dtype": torch.float32, "image_encoder": encoder, "image_processor": wan_image_processor()}))
        return torch.cat([family.encode_first_frame_clip(
            (torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1.0)[None, :, None]) for im in images])

    ours = embed(load_clip_vision_file(vision["comfy_file"], image_dim=CLIP_WIDTH))
    folder = embed(CLIPVisionModel.from_pretrained(str(vision["image_encoder"]), torch_dtype=torch.float32).eval())
    assert torch.equal(ours, folder)
    assert ours.shape == comfy["adapter"].shape == (4, 257, CLIP_WIDTH)
    scale = ours.abs().max().item()
    worst = (ours - comfy["adapter"]).abs().max().item()
    unresized = (ours[3] - comfy["adapter"][3]).abs().max().item()
    print(f"max |ComfyUI CLIP vision - image_encoder_file| {worst:.3e} ({unresized:.3e} for the 224 frame; "
          f"embedding max {scale:.2f})")
    assert unresized < 1e-5 * max(1.0, scale) and worst < 1e-5 * max(1.0, scale)


def test_a_run_checks_the_encoder_files_before_the_dataset_scan(t2v, tmp_path):
    # the run's cheap checks read the encoder file headers right after the model file's: with a missing dataset
    # folder too, the wrong text encoder file is what the user hears about first
    from trainer.loop import train

    clip_l = tmp_path / "clip_l.safetensors"
    save_file({"text_model.encoder.layers.0.layer_norm1.weight": torch.ones(768),
               "text_model.embeddings.token_embedding.weight": torch.zeros(8, 768)}, str(clip_l))
    job = parse_job({
        "job": "early", "output_dir": str(tmp_path / "out"),
        "model": {"family": "wan21", "path": str(t2v["transformer"]), "dtype": "fp32", "config": str(t2v["config"]),
                  "text_encoder_file": str(clip_l), "vae_file": str(t2v["vae"])},
        "datasets": [{"folder_path": str(tmp_path / "no_such_folder"), "resolution": [32], "num_frames": 5}],
        "network": {"linear": 4, "linear_alpha": 4}, "train": {"steps": 2},
    })
    with pytest.raises(JobError, match="CLIP-L") as err:
        train(job)
    assert err.value.field == "model.text_encoder_file"
