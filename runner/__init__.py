"""DeepSeek-OCR PDF → Markdown pipeline (render, blank detection, engines, scheduling, writing)."""

__version__ = "0.1.0"
