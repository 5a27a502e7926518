"""Regenerate tests/fixtures/titok/ from the official TiTok code (bytedance/1d-tokenizer).

Run by hand, never by the test suite (the official code is not a dependency of mstok)::

    git clone https://github.com/bytedance/1d-tokenizer /tmp/1d-tokenizer
    pip install omegaconf transformers accelerate torchvision requests   # what modeling/ imports
    python tools/regenerate_fixtures.py --official /tmp/1d-tokenizer            # all fixtures
    python tools/regenerate_fixtures.py --official /tmp/1d-tokenizer --only legacy_s --out /tmp/fx

What it imports from the checkout (put first on ``sys.path``): ``modeling.modules.blocks``
(TiTokEncoder / TiTokDecoder; their hard-coded ViT size tables are extended with the tiny sizes
of each fixture's ``mstok_extensions.model_sizes`` by re-executing the module's source with one
``**extra`` entry spliced into each table), ``modeling.titok.TiTok``,
``modeling.modules.maskgit_vqgan`` (Decoder / VectorQuantizer: the two-stage fixtures get a
small pixel decoder described by ``mstok_extensions.pixel_decoder`` instead of the 256 px one
``TiTok.__init__`` builds), ``modeling.quantizer.quantizer.DiagonalGaussianDistribution``,
``modeling.maskgit.ImageBert`` / ``UViTBert``, and the release configs
``configs/infer/TiTok/*.yaml``.

What it writes under ``--out`` (default tests/fixtures/titok):

* ``<fixture>/config.json``: the official-style config (OmegaConf dump; the generators keep
  ``image_seq_len`` as the unresolved ``${model.vq_model.num_latent_tokens}``);
* ``<fixture>/model.safetensors`` or ``pytorch_model.bin``: random weights in the official key
  layout, stored as float16 (the references are computed with exactly these rounded weights);
* ``<fixture>/reference.safetensors``: inputs and the official model's outputs, as
  tests/test_convert_titok.py and tests/test_convert_titok_generator.py read them
  (tokenizers: ``images``, ``tokens``, ``recon``, ``decoded`` - or ``mean``, ``logvar``, ``kl``,
  ``decoded`` for the VAE; generators: ``tokens``, ``labels``, ``logits_cond``,
  ``logits_uncond``, ``gen_labels`` and one ``ids_<case>`` per entry of :data:`SAMPLERS`);
* ``official_layouts.json`` / ``official_generator_layouts.json``: for every full-size release,
  the number of keys, of parameters, and the sha256 of the sorted ``"key (shape)"`` lines of the
  state dict the official code builds (on the meta device, nothing allocated).

Random weights come from the official initialisation plus a seeded perturbation of every float
tensor (so LayerNorm affines and biases are not the identity and a converter that drops one
fails). The committed fixtures were made by an earlier version of this procedure, so the tensors
differ; what must hold is that every test of tests/test_convert_titok*.py passes on a fresh set.
Checked against the official code at commit 942a96f with transformers 5.24: the two layout files
came out identical to the committed ones, and every equivalence test passed on the regenerated
tokenizer and generator fixtures (largest decoded-pixel difference 3e-5, tolerance 1e-4).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "titok"


def _vq_spec(enc: str, dec: str, patch: int, k: int, codes: int, c: int, l2: bool, two_stage: bool) -> dict:
    vq = {
        "vit_enc_model_size": enc,
        "vit_dec_model_size": dec,
        "vit_enc_patch_size": patch,
        "vit_dec_patch_size": patch,
        "num_latent_tokens": k,
        "codebook_size": codes,
        "token_size": c,
        "use_l2_norm": l2,
        "commitment_cost": 0.25,
        "finetune_decoder": two_stage,
    }
    if not two_stage:
        vq["is_legacy"] = False
    return {
        "experiment": {"tokenizer_checkpoint": "fixture.bin"},
        "model": {"vq_model": vq},
        "dataset": {"preprocessing": {"crop_size": 32}},
    }


TINY = {
    "tiny_s": {"width": 32, "depth": 2, "num_heads": 4},
    "tiny_b": {"width": 40, "depth": 2, "num_heads": 4},
    "tiny_l": {"width": 48, "depth": 2, "num_heads": 6},
}
PIXEL = {"hidden_channels": 32, "num_res_blocks": 1, "z_channels": 8, "codebook_size": 1024}


def _with_extensions(spec: dict, sizes: list[str], pixel_mult: list[int] | None = None) -> dict:
    ext: dict[str, Any] = {"model_sizes": {name: TINY[name] for name in sizes}}
    if pixel_mult is not None:
        ext["pixel_decoder"] = {"hidden_channels": 32, "channel_mult": pixel_mult, **PIXEL}
    return {**spec, "mstok_extensions": ext}


# fixture -> (official-style config, weights file name, seed)
TOKENIZERS: dict[str, tuple[dict, str, int]] = {
    "legacy_s": (
        _with_extensions(_vq_spec("tiny_s", "tiny_s", 4, 16, 256, 12, True, True), ["tiny_s"], [1, 1, 1]),
        "model.safetensors",
        1,
    ),
    "legacy_b": (
        _with_extensions(_vq_spec("tiny_b", "tiny_b", 2, 8, 128, 12, True, True), ["tiny_b"], [1, 1]),
        "pytorch_model.bin",
        2,
    ),
    "single_vq_sl": (
        _with_extensions(_vq_spec("tiny_s", "tiny_l", 4, 8, 512, 16, False, False), ["tiny_s", "tiny_l"]),
        "model.safetensors",
        3,
    ),
    "vae_ll": (
        _with_extensions(
            {
                "experiment": {"tokenizer_checkpoint": "fixture.bin"},
                "model": {
                    "vq_model": {
                        "vit_enc_model_size": "tiny_l",
                        "vit_dec_model_size": "tiny_l",
                        "vit_enc_patch_size": 4,
                        "vit_dec_patch_size": 4,
                        "num_latent_tokens": 8,
                        "quantize_mode": "vae",
                        "token_size": 4,
                        "finetune_decoder": False,
                        "is_legacy": False,
                    }
                },
                "dataset": {"preprocessing": {"crop_size": 32}},
            },
            ["tiny_l"],
        ),
        "model.safetensors",
        4,
    ),
}


def _generator_spec(model_type: str, layers: int, decay: str) -> dict:
    return {
        "experiment": {"generator_checkpoint": "fixture.bin"},
        "model": {
            "vq_model": {"codebook_size": 64, "num_latent_tokens": 8},
            "generator": {
                "model_type": model_type,
                "hidden_size": 32,
                "num_hidden_layers": layers,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "dropout": 0.1,
                "attn_drop": 0.1,
                "num_steps": 8,
                "class_label_dropout": 0.1,
                "image_seq_len": "${model.vq_model.num_latent_tokens}",
                "condition_num_classes": 10,
                "randomize_temperature": 2.0,
                "guidance_scale": 3.0,
                "guidance_decay": decay,
            },
        },
        "dataset": {"preprocessing": {"crop_size": 32}},
    }


GENERATORS: dict[str, tuple[dict, str, int]] = {
    "generator_bert": (_generator_spec("ViT", 2, "linear"), "model.safetensors", 5),
    "generator_uvit": (_generator_spec("UViT", 4, "power-cosine"), "pytorch_model.bin", 6),
}
# Sampler cases (tests/test_convert_titok_generator.py reads this table):
# (randomize_temperature, guidance_scale, guidance_decay, num_sample_steps, torch.manual_seed or None)
SAMPLERS: dict[str, tuple[float, float, str, int, int | None]] = {
    "greedy": (0.0, 0.0, "constant", 8, None),
    "greedy_s4": (0.0, 0.0, "constant", 4, None),
    "greedy_constant": (0.0, 1.5, "constant", 8, None),
    "greedy_linear": (0.0, 2.0, "linear", 8, None),
    "greedy_power_cosine": (0.0, 3.0, "power-cosine", 8, None),
    "noisy_linear": (2.0, 2.0, "linear", 8, 7),
    "noisy_none": (3.0, 0.0, "constant", 8, 11),
    "noisy_power_cosine": (2.0, 3.0, "power-cosine", 8, 13),
    "noisy_softmax": (2.0, 2.0, "linear", 8, 17),  # with softmax_temperature_annealing=True
}
GENERATOR_RELEASES = ("titok_l32", "titok_b64", "titok_s128")


# ----------------------------------------------------------------------------- official code
def import_official(checkout: Path) -> dict[str, Any]:
    """Import the official modules, with the tiny ViT sizes added to blocks.py's size tables."""
    if not (checkout / "modeling" / "titok.py").is_file():
        raise SystemExit(f"{checkout} is not a bytedance/1d-tokenizer checkout (no modeling/titok.py)")
    sys.path.insert(0, str(checkout))
    blocks = importlib.import_module("modeling.modules.blocks")
    source = Path(blocks.__file__).read_text()
    patched, count = re.subn(r"self\.(width|num_layers|num_heads) = \{", r'self.\1 = {**_MSTOK_SIZES["\1"], ', source)
    if count < 6:  # encoder and decoder, three tables each
        raise SystemExit(f"{blocks.__file__}: expected 6 ViT size tables to extend, found {count}")
    blocks._MSTOK_SIZES = {
        "width": {name: s["width"] for name, s in TINY.items()},
        "num_layers": {name: s["depth"] for name, s in TINY.items()},
        "num_heads": {name: s["num_heads"] for name, s in TINY.items()},
    }
    exec(compile(patched, blocks.__file__, "exec"), blocks.__dict__)  # redefines the classes in place
    titok = importlib.import_module("modeling.titok")
    titok.TiTokEncoder, titok.TiTokDecoder = blocks.TiTokEncoder, blocks.TiTokDecoder
    return {
        "TiTok": titok.TiTok,
        "PixelDecoder": importlib.import_module("modeling.modules.maskgit_vqgan").Decoder,
        "PixelQuantizer": importlib.import_module("modeling.modules.maskgit_vqgan").VectorQuantizer,
        "Gaussian": importlib.import_module("modeling.quantizer.quantizer").DiagonalGaussianDistribution,
        "ImageBert": importlib.import_module("modeling.maskgit").ImageBert,
        "UViTBert": importlib.import_module("modeling.maskgit").UViTBert,
        "OmegaConf": importlib.import_module("omegaconf").OmegaConf,
    }


def perturb_and_round(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Add seeded noise to every float tensor, round to float16, load the rounded values back;
    returns the float16 state dict to save."""
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    saved = {}
    for key, value in state.items():
        if value.is_floating_point():
            # matrices and kernels: LeCun-scale noise, so activations and logits are O(1) (a proxy head
            # with near-uniform softmax would feed the pixel decoder near-zero inputs); vectors: small noise
            scale = value[0].numel() ** -0.5 if value.dim() >= 2 else 0.02
            value = value + scale * torch.randn(value.shape, generator=gen)
            saved[key] = value.half().contiguous()
        else:
            saved[key] = value.contiguous()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in saved.items()}, strict=True)
    return saved


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


def save_reference(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


def small_pixel_decoder(official: dict[str, Any], model: torch.nn.Module, desc: dict, crop: int) -> None:
    """Swap TiTok's 256 px MaskGIT-VQGAN pixel quantizer/decoder for the fixture's small one."""
    conf = official["OmegaConf"].create(
        {
            "channel_mult": desc["channel_mult"],
            "num_resolutions": len(desc["channel_mult"]),
            "dropout": 0.0,
            "hidden_channels": desc["hidden_channels"],
            "num_channels": 3,
            "num_res_blocks": desc["num_res_blocks"],
            "resolution": crop,
            "z_channels": desc["z_channels"],
        }
    )
    model.pixel_quantize = official["PixelQuantizer"](
        num_embeddings=desc["codebook_size"], embedding_dim=desc["z_channels"], commitment_cost=0.25
    )
    model.pixel_decoder = official["PixelDecoder"](conf)
    # The proxy VQGAN's codes are O(1) vectors; the quantizer's tiny uniform init would leave the pixel
    # decoder's first GroupNorm dividing by a variance near its eps, which no float32 port reproduces.
    with torch.no_grad():
        model.pixel_quantize.embedding.weight.normal_()


# ----------------------------------------------------------------------------- fixtures
def make_tokenizer(official: dict[str, Any], name: str, out: Path) -> None:
    spec, weights_name, seed = TOKENIZERS[name]
    config = official["OmegaConf"].create({k: v for k, v in spec.items() if k != "mstok_extensions"})
    torch.manual_seed(seed)
    model = official["TiTok"](config)
    crop = spec["dataset"]["preprocessing"]["crop_size"]
    if spec["model"]["vq_model"].get("finetune_decoder", True):
        small_pixel_decoder(official, model, spec["mstok_extensions"]["pixel_decoder"], crop)
    model.eval()
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(perturb_and_round(model, seed + 100), folder / weights_name)
    (folder / "config.json").write_text(json.dumps(spec, indent=2) + "\n")
    images = torch.rand(2, 3, crop, crop, generator=torch.Generator().manual_seed(seed + 200))
    with torch.no_grad():
        if spec["model"]["vq_model"].get("quantize_mode", "vq") == "vae":
            z = model.encoder(pixel_values=images, latent_tokens=model.latent_tokens)  # (B, 2C, 1, K)
            post = official["Gaussian"](z)

            def to_bkc(t: torch.Tensor) -> torch.Tensor:
                return t[:, :, 0, :].transpose(1, 2).float()  # official (B, C, 1, K) -> mstok (B, K, C)

            ref = {
                "images": images,
                "mean": to_bkc(post.mean),
                "logvar": to_bkc(post.logvar),
                # the official loss's reduction: summed over tokens and channels, averaged over images
                "kl": (post.kl().sum() / images.shape[0]).float(),
                "decoded": model.decode_tokens(post.mean).float(),  # unclamped
            }
        else:
            z_quantized, result = model.encode(images)
            tokens = result["min_encoding_indices"].reshape(images.shape[0], -1).long()
            ref = {
                "images": images,
                "tokens": tokens,
                "recon": model.decode(z_quantized).float(),  # forward(), unclamped
                "decoded": model.decode_tokens(tokens).float(),  # unclamped
            }
    save_reference(ref, folder / "reference.safetensors")


def make_generator(official: dict[str, Any], name: str, out: Path) -> None:
    spec, weights_name, seed = GENERATORS[name]
    config = official["OmegaConf"].create(spec)
    gen_cfg = spec["model"]["generator"]
    torch.manual_seed(seed)
    model = official["ImageBert" if gen_cfg["model_type"] == "ViT" else "UViTBert"](config).eval()
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(perturb_and_round(model, seed + 100), folder / weights_name)
    (folder / "config.json").write_text(json.dumps(spec, indent=4) + "\n")
    v, k, classes = spec["model"]["vq_model"]["codebook_size"], 8, gen_cfg["condition_num_classes"]
    rng = torch.Generator().manual_seed(seed + 200)
    tokens = torch.randint(0, v + 1, (4, k), generator=rng)  # id v is the mask token
    labels = torch.tensor([1, 5, 9, classes])  # the last one is the dropped-label id as an input
    ref: dict[str, torch.Tensor] = {"tokens": tokens, "labels": labels}
    with torch.no_grad():
        ref["logits_cond"] = model(tokens, labels.clone(), cond_drop_prob=0.0).float()
        ref["logits_uncond"] = model(tokens, labels.clone(), cond_drop_prob=1.0).float()
        gen_labels = torch.tensor([0, 3, 6, 9])
        ref["gen_labels"] = gen_labels
        for case, (temperature, scale, decay, steps, case_seed) in SAMPLERS.items():
            if case_seed is not None:
                torch.manual_seed(case_seed)
            ids = model.generate(
                gen_labels.clone(),
                guidance_scale=scale,
                guidance_decay=decay,
                randomize_temperature=temperature,
                softmax_temperature_annealing=case == "noisy_softmax",
                num_sample_steps=steps,
            )
            ref[f"ids_{case}"] = ids.long()
    save_reference(ref, folder / "reference.safetensors")


def _layout(model: torch.nn.Module) -> dict[str, Any]:
    items = sorted((key, tuple(value.shape)) for key, value in model.state_dict().items())
    lines = "".join(f"{key} {shape}\n" for key, shape in items)
    return {
        "keys": len(items),
        "parameters": sum(math.prod(shape) for _, shape in items),
        "sha256": hashlib.sha256(lines.encode()).hexdigest(),
    }


def make_layouts(official: dict[str, Any], checkout: Path, out: Path) -> None:
    omega = official["OmegaConf"]
    layouts, generator_layouts = {}, {}
    for path in sorted((checkout / "configs" / "infer" / "TiTok").glob("titok_*.yaml")):
        config = omega.load(path)
        with torch.device("meta"):
            layouts[path.stem] = _layout(official["TiTok"](config))
        if path.stem in GENERATOR_RELEASES:
            generator = omega.to_container(config.model.generator, resolve=True)
            cls = "ImageBert" if generator["model_type"] == "ViT" else "UViTBert"
            with torch.device("meta"):
                entry = _layout(official[cls](config))
            generator_layouts[path.stem] = {"model_type": generator["model_type"], "class": cls, **entry}
            generator_layouts[path.stem]["generator"] = generator
    (out / "official_layouts.json").write_text(json.dumps(layouts, indent=2, sort_keys=True) + "\n")
    (out / "official_generator_layouts.json").write_text(json.dumps(generator_layouts, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Regenerate tests/fixtures/titok from a bytedance/1d-tokenizer checkout (see the module doc)."
    )
    parser.add_argument("--official", type=Path, required=True, help="path of the official checkout")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    names = [*TOKENIZERS, *GENERATORS, "layouts"]
    parser.add_argument("--only", nargs="+", choices=names, help="regenerate only these (default: all)")
    args = parser.parse_args(argv)
    official = import_official(args.official.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or names:
        if name in TOKENIZERS:
            make_tokenizer(official, name, args.out)
        elif name in GENERATORS:
            make_generator(official, name, args.out)
        else:
            make_layouts(official, args.official.resolve(), args.out)
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
