"""Model adapters: everything model-specific lives here, one adapter per model.

Prompts, resolution modes, special tokens, sampling defaults, stop handling and repetition-guard
settings. Engines (vLLM, Transformers) read an adapter; nothing else in the product knows about
DeepSeek-OCR specifics. Token ids are never written down here: ``resolve_special_tokens`` looks
them up in the tokenizer at start-up and asserts they exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Special tokens by role. Values are token *strings*; ids come from the tokenizer.
IMAGE_TOKEN = "<image>"
GROUNDING_TOKEN = "<|grounding|>"
REF_OPEN, REF_CLOSE = "<|ref|>", "<|/ref|>"
DET_OPEN, DET_CLOSE = "<|det|>", "<|/det|>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"  # full-width bars (U+FF5C) and U+2581
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
# Table tags are single added tokens; the n-gram guard must not ban them (tables repeat
# ``<td></td>`` legitimately).
TABLE_TAG_TOKENS = ("<td>", "</td>", "<tr>", "</tr>")


@dataclass(frozen=True)
class Resolution:
    """One resolution mode: global view size, crop tile size, whether tiles are used."""

    name: str
    base_size: int
    image_size: int
    crop_mode: bool


@dataclass(frozen=True)
class GuardSettings:
    """No-repeat n-gram guard: ban a token that would complete an n-gram already seen in the
    last ``window`` tokens. Whitelisted tokens (table tags) are never banned."""

    ngram_size: int = 30
    window: int = 90
    whitelist_tokens: tuple[str, ...] = TABLE_TAG_TOKENS


@dataclass(frozen=True)
class SpecialTokenIds:
    eos: int
    image: int
    whitelist: tuple[int, ...]
    ids: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelAdapter:
    key: str  # "deepseek-ocr" | "deepseek-ocr-2"
    default_model: str  # hub id
    architectures: tuple[str, ...]  # config.json ``architectures`` values that select this adapter
    resolutions: dict[str, Resolution]
    default_resolution: str
    large_resolution: str  # used by the second (Large-mode) pass
    prompts: dict[str, str]
    max_tokens: int = 8192
    temperature: float = 0.0
    guard: GuardSettings = GuardSettings()
    required_tokens: tuple[str, ...] = (
        IMAGE_TOKEN,
        GROUNDING_TOKEN,
        REF_OPEN,
        REF_CLOSE,
        DET_OPEN,
        DET_CLOSE,
        *TABLE_TAG_TOKENS,
    )

    def prompt(self, mode: str) -> str:
        try:
            return self.prompts[mode]
        except KeyError:
            raise ValueError(f"unknown prompt mode {mode!r}; choose from {sorted(self.prompts)}") from None

    def resolution(self, name: str | None) -> Resolution:
        name = name or self.default_resolution
        try:
            return self.resolutions[name]
        except KeyError:
            raise ValueError(
                f"{self.key} has no resolution {name!r}; choose from {sorted(self.resolutions)}"
            ) from None

    def resolve_special_tokens(self, tokenizer: Any) -> SpecialTokenIds:
        """Look special-token ids up in ``tokenizer`` and assert each one is a single known token."""
        ids: dict[str, int] = {}
        unk = getattr(tokenizer, "unk_token_id", None)
        for tok in (*self.required_tokens, EOS_TOKEN):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or (unk is not None and tid == unk) or not isinstance(tid, int) or tid < 0:
                raise RuntimeError(f"tokenizer has no special token {tok!r}: wrong tokenizer for {self.key}?")
            ids[tok] = tid
        eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos_id is not None and eos_id != ids[EOS_TOKEN]:
            raise RuntimeError(f"tokenizer EOS id {eos_id} does not match {EOS_TOKEN!r} ({ids[EOS_TOKEN]})")
        return SpecialTokenIds(
            eos=ids[EOS_TOKEN],
            image=ids[IMAGE_TOKEN],
            whitelist=tuple(ids[t] for t in self.guard.whitelist_tokens),
            ids=ids,
        )


# Both output modes use the upstream grounding prompt: the model was trained to lay out pages
# with it, and its boxes are what lets ``clean`` mode crop figures into assets. The modes differ
# only in post-processing. ``roi`` re-reads a cropped region as plain text.
_PROMPTS = {
    "clean": f"{IMAGE_TOKEN}\n{GROUNDING_TOKEN}Convert the document to markdown.",
    "grounded": f"{IMAGE_TOKEN}\n{GROUNDING_TOKEN}Convert the document to markdown.",
    "markdown": f"{IMAGE_TOKEN}\nConvert the document to markdown.",
    "roi": f"{IMAGE_TOKEN}\nFree OCR.",
}

DEEPSEEK_OCR = ModelAdapter(
    key="deepseek-ocr",
    default_model="deepseek-ai/DeepSeek-OCR",
    architectures=("DeepseekOCRForCausalLM",),
    resolutions={
        "tiny": Resolution("tiny", 512, 512, False),
        "small": Resolution("small", 640, 640, False),
        "base": Resolution("base", 1024, 1024, False),
        "large": Resolution("large", 1280, 1280, False),
        "gundam": Resolution("gundam", 1024, 640, True),
    },
    default_resolution="gundam",
    large_resolution="large",
    prompts=_PROMPTS,
)

DEEPSEEK_OCR_2 = ModelAdapter(
    key="deepseek-ocr-2",
    default_model="deepseek-ai/DeepSeek-OCR-2",
    architectures=("DeepseekOCR2ForCausalLM", "DeepseekOcr2ForConditionalGeneration"),
    # OCR-2's encoder takes a 1024 global view plus 0-6 768 tiles.
    resolutions={
        "base": Resolution("base", 1024, 1024, False),
        "gundam": Resolution("gundam", 1024, 768, True),
    },
    default_resolution="gundam",
    large_resolution="base",
    prompts=_PROMPTS,
)

ADAPTERS = {a.key: a for a in (DEEPSEEK_OCR, DEEPSEEK_OCR_2)}


def adapter_for_config(config: dict[str, Any]) -> ModelAdapter:
    """Pick the adapter from a model's ``config.json`` contents."""
    archs = set(config.get("architectures") or [])
    mtype = str(config.get("model_type", ""))
    for a in ADAPTERS.values():
        if archs & set(a.architectures):
            return a
    if "2" in mtype or "v2" in str(config.get("vision_config", {}).get("model_type", "")):
        return DEEPSEEK_OCR_2
    if "ocr" in mtype.lower() or "deepseek" in mtype.lower():
        return DEEPSEEK_OCR
    raise ValueError(f"not a DeepSeek-OCR model config (architectures={sorted(archs)}, model_type={mtype!r})")
