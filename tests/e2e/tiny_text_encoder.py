"""A tiny UMT5 text encoder that both ComfyUI and the Wan 2.1 family can load, from the same weights.

Real Wan 2.1 users have ``models/text_encoders/umt5_xxl_*.safetensors``: the UMT5-XXL encoder under Hugging Face
T5 key names plus a ``spiece_model`` tensor (the SentencePiece model's bytes, which ComfyUI's umt5 tokenizer
reads). Here the same layout is built at test size:

- a SentencePiece unigram model trained in-process (pad 0, </s> 1, unk 2, as umt5's), converted for the
  diffusers side by transformers' own SentencePiece converter (needs the `protobuf` package);
- a transformers UMT5EncoderModel, 24 layers x d_model 4096 (ComfyUI detects a T5-XXL-class encoder by a
  4096-wide block 23; the tiny Wan transformer's text_dim is 4096 too), 2 heads x 8, d_ff 16: 8 M parameters;
- the ComfyUI file (encoder weights + spiece_model) and the diffusers ``text_encoder`` / ``tokenizer`` folders.

ComfyUI builds its UMT5 from the fixed umt5_config_xxl.json whatever the file holds, so the same facts are also
written as a ComfyUI config JSON (`comfy_config`) for tests/e2e/comfy_tiny_umt5, which points ComfyUI at it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

LAYERS = 24
D_MODEL = 4096
HEADS = 2
D_KV = 8
D_FF = 16
CORPUS = [
    "a moving texture number 0", "a moving texture number 1", "a red fox jumps over the lazy dog",
    "a cat sitting on a windowsill at sunset", "slow motion video of waves breaking on rocks",
    "the quick brown fox, cinematic lighting", "a person walking in the rain at night",
    "masterpiece, best quality, a castle on a hill", "ohwx style painting of flowers in a vase",
] * 8


def train_sentencepiece(vocab_size: int = 80) -> bytes:
    """A real SentencePiece unigram model with umt5's special ids (deterministic for a fixed corpus)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2, hard_vocab_limit=False,
    )
    return buf.getvalue()


def comfy_config(vocab_size: int) -> dict:
    """The tiny model in ComfyUI's umt5_config_xxl.json form (same keys, tiny sizes)."""
    return {"d_ff": D_FF, "d_kv": D_KV, "d_model": D_MODEL, "decoder_start_token_id": 0, "dropout_rate": 0.1,
            "eos_token_id": 1, "dense_act_fn": "gelu_pytorch_tanh", "initializer_factor": 1.0,
            "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "umt5",
            "num_decoder_layers": LAYERS, "num_heads": HEADS, "num_layers": LAYERS, "output_past": True,
            "pad_token_id": 0, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
            "vocab_size": vocab_size}


def build_tiny_umt5(out: Path, seed: int = 0) -> dict[str, Path]:
    """Write out/text_encoder, out/tokenizer (diffusers folder parts), out/tiny_umt5.safetensors (ComfyUI file)
    and out/tiny_umt5_comfy_config.json. Returns their paths by those names."""
    from safetensors.torch import save_file
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    proto = train_sentencepiece()
    (out / "spiece").mkdir(exist_ok=True)
    (out / "spiece" / "spiece.model").write_bytes(proto)
    tokenizer = T5Tokenizer.from_pretrained(str(out / "spiece"), extra_ids=0, legacy=False,
                                            model_max_length=512)
    if len(tokenizer) < 20 or tokenizer.pad_token_id != 0 or tokenizer.eos_token_id != 1:
        raise RuntimeError(f"SentencePiece conversion failed (is protobuf installed?): {len(tokenizer)} tokens")
    tokenizer.save_pretrained(str(out / "tokenizer"))
    config = UMT5Config(vocab_size=len(tokenizer), d_model=D_MODEL, d_kv=D_KV, d_ff=D_FF, num_layers=LAYERS,
                        num_heads=HEADS, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config).eval()
    model.save_pretrained(str(out / "text_encoder"))
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
               if k != "encoder.embed_tokens.weight"}  # tied to shared.weight; ComfyUI's files hold shared only
    tensors["spiece_model"] = torch.frombuffer(bytearray(proto), dtype=torch.uint8).clone()
    comfy_file = out / "tiny_umt5.safetensors"
    save_file(tensors, str(comfy_file))
    config_file = out / "tiny_umt5_comfy_config.json"
    config_file.write_text(json.dumps(comfy_config(len(tokenizer)), indent=1))
    return {"text_encoder": out / "text_encoder", "tokenizer": out / "tokenizer", "comfy_file": comfy_file,
            "comfy_config": config_file}
