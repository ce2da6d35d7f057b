"""`load_policy`: a policy model with its tokenizer and image preprocessing, from a preset name or a checkpoint.

A checkpoint folder is what `Policy.save` writes and what real HF repositories hold: the model (config.json +
safetensors), the tokenizer files (special tokens and a chat template) and preprocessor_config.json. Two families:
- InternVL (-hf): the tokenizer has `<img>`, `</img>`, `<IMG_CONTEXT>`; the preprocessor config's tile size, tile
  bounds and normalisation drive our C++ tiler (`Tiling`).
- Qwen-VL (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), through `AutoModelForImageTextToText`: HF's own image processor
  (`AutoImageProcessor`: `pixel_values` patches + `image_grid_thw`) and the tokenizer's chat template. Not
  `AutoProcessor`: it loads the video processor too, which needs torchvision (transformers#48558), so the
  collate expands `<|image_pad|>` itself, as Qwen2VLProcessor does.
Log-probs for GRPO come the standard HF way: `model(..., output_hidden_states=True).hidden_states[-1]` and
`model.get_output_embeddings().weight` (the lm_head).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    InternVLForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from grpo_fast.models.tiny import TinySpec, build_tokenizer, tiny_internvl
from grpo_fast.vision import IMAGENET_MEAN, IMAGENET_STD, TiledImage, dynamic_tile

PRESETS = {"tiny": TinySpec()}
# model_type of the checkpoints loaded through AutoModelForImageTextToText + AutoImageProcessor
QWEN_VL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


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
    """A VLM, its tokenizer and its image preprocessing: all `grpo_fast.models.inputs` needs to build inputs.
    InternVL has `tiling` (our tiler), Qwen-VL `image_processor` (HF's); exactly one is set."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    tiling: Tiling | None
    image_processor: BaseImageProcessor | None = None

    @property
    def image_token_id(self) -> int:
        """The token that stands for one image embedding in the prompt (`<IMG_CONTEXT>`, `<|image_pad|>`)."""
        return self.model.config.image_token_id

    @property
    def image_seq_length(self) -> int:
        """Image tokens per tile: (tile / patch)^2 patches, times downsample_ratio^2 after the pixel shuffle."""
        cfg = self.model.config
        patches = (cfg.vision_config.image_size[0] // cfg.vision_config.patch_size[0]) ** 2
        return int(patches * cfg.downsample_ratio**2)

    def save(self, path: Path | str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Writes a checkpoint folder that `load_policy(path)` (and HF's from_pretrained) reads back; `state_dict`:
        the full weights to write instead of the model's own (those of a sharded model, gathered)."""
        self.model.save_pretrained(path, state_dict=state_dict)
        self.tokenizer.save_pretrained(path)
        processor = self.tiling.image_processor() if self.tiling is not None else self.image_processor
        processor.save_pretrained(path)


def load_policy(name_or_path: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Policy:
    """A preset (`"tiny"`: freshly initialised with `seed`) or an InternVL -hf / Qwen-VL checkpoint (local folder or
    cached hub id).

    Raises ValueError naming the problem for an unknown name or a checkpoint of another family.
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
        if config.model_type not in ("internvl", *QWEN_VL):
            raise ValueError(
                f"{name!r} is a {config.model_type!r} model; supported: InternVL (-hf), {', '.join(QWEN_VL)}"
            )
        tokenizer = AutoTokenizer.from_pretrained(name)
        if config.model_type == "internvl":
            model = InternVLForConditionalGeneration.from_pretrained(name, dtype=dtype)
            return Policy(model, tokenizer, Tiling.from_pretrained(name))
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype)
        return Policy(model, tokenizer, None, AutoImageProcessor.from_pretrained(name))
    except OSError as e:
        raise ValueError(
            f"cannot load model {name!r}: not a preset ({', '.join(PRESETS)}), nor an InternVL -hf / Qwen-VL "
            f"checkpoint folder or cached hub id ({str(e).splitlines()[0]})"
        ) from e
