"""What the edge does with real photos of anything but its classes: each picture in a folder
through the torch-free edge (`edge.npz`), as `splitexit edge --source FOLDER` would fit it,
with the exit's confidence alone (before #29) and with the unfamiliarity score (now).

    python -m benchmarks.unfamiliar_photos PHOTOS [--artifacts runs/default]

The folder used in docs/unfamiliar.md is scikit-image's sample pictures (a cat, a rocket,
coins, a horse, the moon, a page of text, ...), written as PNGs by:

    python3 -m venv /tmp/skv --system-site-packages && /tmp/skv/bin/pip install scikit-image
    /tmp/skv/bin/python -m benchmarks.unfamiliar_photos --write-skimage PHOTOS
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from benchmarks import add_tiny
from pipeline.edge.numpy_head import exit_scores, load_numpy_head
from pipeline.edge.source_base import as_pixels

SKIMAGE = ("astronaut", "brick", "camera", "cat", "checkerboard", "clock", "coffee", "coins",
           "colorwheel", "grass", "gravel", "horse", "logo", "moon", "page", "rocket", "text",
           "hubble_deep_field", "immunohistochemistry", "retina", "microaneurysms")
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def write_skimage(folder: Path) -> None:
    import skimage.data
    folder.mkdir(parents=True, exist_ok=True)
    for name in SKIMAGE:
        image = getattr(skimage.data, name)()
        if image.dtype != np.uint8:   # bool or float pictures: stretched to 0-255
            image = image.astype(np.float64)
            image = (255 * (image - image.min()) / max(np.ptp(image), 1e-9)).astype(np.uint8)
        if image.ndim == 3:           # RGB(A) -> BGR, as OpenCV reads a file
            image = image[..., :3][..., ::-1]
        cv2.imwrite(str(folder / f"{name}.png"), image)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("photos", type=Path, help="a folder of pictures")
    ap.add_argument("--artifacts", default="runs/default", help="a training folder")
    ap.add_argument("--write-skimage", action="store_true",
                    help="first write scikit-image's sample pictures into PHOTOS")
    add_tiny(ap)   # the run is seconds already: --tiny changes nothing
    args = ap.parse_args()
    if args.write_skimage:
        write_skimage(args.photos)
    head = load_numpy_head(args.artifacts)
    files = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in SUFFIXES)
    if not files:
        raise SystemExit(f"error: no {', '.join(SUFFIXES)} pictures in {args.photos}")
    pixels = np.stack([as_pixels(cv2.imread(str(f), cv2.IMREAD_UNCHANGED), head.input_shape,
                                 head.resize) for f in files])
    logits, hidden = head.run_exit(pixels)
    confidence = exit_scores(logits, head.score, head.temperature)
    sure = confidence >= head.threshold
    distance, flagged = head.unfamiliar(hidden)
    tail = served(args.artifacts, pixels)
    threshold = head.unfamiliarity.threshold if head.unfamiliarity else None
    print(f"model {head.model_id}: exit threshold {head.threshold:.3f}, unfamiliarity "
          f"threshold {threshold}\n\n| picture | exit's class | confidence | answered by the "
          f"exit before | unfamiliarity | flagged | answered by the exit now | the tail's answer "
          f"if offloaded |\n|---|---|---|---|---|---|---|---|")
    for f, c, p, s, u, flag, t in zip(files, logits.argmax(1), confidence, sure, distance,
                                      flagged, tail):
        print(f"| {f.stem} | {head.classes[c]} | {p:.3f} | {'yes' if s else 'no'} | {u:.0f} | "
              f"{'yes' if flag else 'no'} | {'yes' if s and not flag else 'no'} | "
              f"{'unknown' if t < 0 else head.classes[t]} |")
    print(f"\n{len(files)} pictures: the exit answered {int(sure.sum())} before (median "
          f"confidence {np.median(confidence[sure]) if sure.any() else float('nan'):.3f}), "
          f"{int((sure & ~flagged).sum())} now; {int(flagged.sum())} flagged unfamiliar; the "
          f"tail answers {int((tail[~(sure & ~flagged)] < 0).sum())} of the "
          f"{int((~(sure & ~flagged)).sum())} offloaded `unknown`")


def served(artifacts: str, pixels: np.ndarray) -> np.ndarray:
    """What the tail (server.pt) answers for each picture were it offloaded: a class, or -1
    (unknown) where its own score flags it; the features cross as the wire sends them."""
    from pipeline.model.artifacts import load_model
    from pipeline.model.unfamiliar_fit import activations, tail_answers
    model, _, server = load_model(artifacts)
    return tail_answers(activations(model, pixels), server.unfamiliarity)


if __name__ == "__main__":
    main()
