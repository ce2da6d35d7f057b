"""`load_policy`: a policy model with its tokenizer and tiling, from a preset name or an InternVL -hf checkpoint.

A checkpoint folder is what `Policy.save` writes and what real -hf InternVL repositories hold: the model
(config.json + safetensors), the tokenizer files (with InternVL's `<img>`, `</img>`, `<IMG_CONTEXT>` tokens
and a chat template) and preprocessor_config.json, whose tile size, tile bounds and normalisation drive the
tiling. Log-probs for GRPO come the standard HF way: `model(..., output_hidden_states=True).hidden_states[-1]`
and `model.get_output_embeddings().weight` (the lm_head).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, AutoTokenizer, InternVLForConditionalGeneration, PreTrainedTokenizerBase
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from grpo_fast.models.tiny import TinySpec, build_tokenizer, tiny_internvl
from grpo_fast.vision import IMAGENET_MEAN, IMAGENET_STD, TiledImage, dynamic_tile

PRESETS = {"tiny": TinySpec()}


@dataclass(frozen=True)
class Tiling:
    """InternVL's dynamic-resolution tiling settings (`grpo_fast.vision.dynamic_tile` arguments)."""

    tile_size: int
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def tile(self, image: Image.Image) -> TiledImage:
        """`pixel_values` float32 [n, 3, tile, tile] and the (cols, rows) grid of one RGB image."""
        return dynamic_tile(
            image, self.tile_size, self.min_tiles, self.max_tiles, self.use_thumbnail, mean=self.mean, std=self.std
        )

    def image_processor(self) -> GotOcr2ImageProcessorPil:
        """The HF image processor with these settings (what -hf checkpoints store as preprocessor_config.json)."""
        return GotOcr2ImageProcessorPil(
            size={"height": self.tile_size, "width": self.tile_size},
            min_patches=self.min_tiles,
            max_patches=self.max_tiles,
            crop_to_patches=self.use_thumbnail,
            image_mean=list(self.mean),
            image_std=list(self.std),
        )

    @classmethod
    def from_pretrained(cls, path: str) -> Tiling:
        p = GotOcr2ImageProcessorPil.from_pretrained(path)
        return cls(
            p.size.height, p.min_patches, p.max_patches, p.crop_to_patches, tuple(p.image_mean), tuple(p.image_std)
        )


@dataclass
class Policy:
    """An InternVL model, its tokenizer and its tiling: all `grpo_fast.data.collate` needs to build inputs."""

    model: InternVLForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    tiling: Tiling

    @property
    def image_seq_length(self) -> int:
        """Image tokens per tile: (tile / patch)^2 patches, times downsample_ratio^2 after the pixel shuffle."""
        cfg = self.model.config
        patches = (cfg.vision_config.image_size[0] // cfg.vision_config.patch_size[0]) ** 2
        return int(patches * cfg.downsample_ratio**2)

    def save(self, path: Path | str) -> None:
        """Writes a checkpoint folder that `load_policy(path)` (and HF's from_pretrained) reads back."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.tiling.image_processor().save_pretrained(path)


def load_policy(name_or_path: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Policy:
    """A preset (`"tiny"`: freshly initialised with `seed`) or an InternVL -hf checkpoint (local folder or cached id).

    Raises ValueError naming the problem for an unknown name or a checkpoint that is not InternVL.
    """
    name = str(name_or_path)
    if name in PRESETS:
        spec = PRESETS[name]
        tokenizer = build_tokenizer()
        tiling = Tiling(spec.tile_size, 1, spec.max_tiles, True, IMAGENET_MEAN, IMAGENET_STD)
        return Policy(tiny_internvl(tokenizer, spec, seed=seed).to(dtype), tokenizer, tiling)
    if "/" not in name and not Path(name).exists():  # hub ids are "org/name": a bare word was meant as a preset
        raise ValueError(f"unknown model {name!r}: not a preset ({', '.join(PRESETS)}) nor an existing folder")
    try:
        config = AutoConfig.from_pretrained(name)
        if config.model_type != "internvl":
            raise ValueError(
                f"{name!r} is a {config.model_type!r} model; only InternVL (-hf) checkpoints are supported"
            )
        model = InternVLForConditionalGeneration.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
        tiling = Tiling.from_pretrained(name)
    except OSError as e:
        raise ValueError(
            f"cannot load model {name!r}: not a preset ({', '.join(PRESETS)}), nor an InternVL -hf checkpoint "
            f"folder or cached hub id ({str(e).splitlines()[0]})"
        ) from e
    return Policy(model, tokenizer, tiling)
