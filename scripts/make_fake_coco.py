"""Write the small fake COCO under data/examples/fake_coco/ (committed and shipped with the package, for the notebooks and tests; re-run to re-create it).

Six JPEG images named like COCO val2014 files, with ids that are not COCO's (900000001...), an
instances file with polygon segmentations (one instance with a box only), and an image-id list.
Objects are drawn as filled shapes in their category's colour on a textured background.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "data" / "examples" / "fake_coco"
CATEGORIES = {1: "person", 2: "bicycle", 3: "car", 15: "bench", 17: "cat", 18: "dog", 28: "umbrella", 34: "frisbee",
              88: "teddy bear"}
COLOURS = {1: (200, 60, 60), 2: (60, 200, 60), 3: (60, 60, 200), 15: (200, 200, 60), 17: (200, 60, 200),
           18: (60, 200, 200), 28: (240, 140, 20), 34: (250, 250, 250), 88: (120, 70, 20)}
# image -> objects (category id, polygon as [x, y, ...] in pixels; None = a box-only instance)
IMAGES = {
    900000001: [(1, [10, 10, 40, 10, 40, 60, 10, 60]), (18, [50, 30, 80, 30, 80, 60]), (34, [85, 10, 110, 10, 110, 30]),
                (3, [70, 62, 120, 62, 120, 80, 70, 80])],
    900000002: [(18, [5, 40, 45, 40, 45, 80, 5, 80]), (3, [60, 10, 120, 10, 120, 40, 60, 40]),
                (2, [50, 50, 90, 50, 70, 85]), (15, None)],
    900000003: [(1, [20, 5, 50, 5, 50, 50, 20, 50]), (88, [60, 40, 120, 40, 120, 85, 60, 85]),
                (17, [5, 60, 35, 60, 35, 85, 5, 85]), (28, [70, 5, 110, 5, 90, 30])],
    900000004: [(2, [10, 20, 60, 20, 60, 70, 10, 70]), (1, [70, 10, 100, 10, 100, 60, 70, 60]),
                (3, [30, 72, 110, 72, 110, 88, 30, 88])],
    900000005: [(17, [10, 10, 50, 10, 50, 50, 10, 50]), (15, [60, 50, 120, 50, 120, 80, 60, 80]),
                (28, [60, 5, 100, 5, 80, 40]), (18, [10, 60, 40, 60, 40, 88, 10, 88])],
    900000006: [(34, [10, 10, 40, 10, 40, 30, 10, 30]), (1, [50, 5, 80, 5, 80, 70, 50, 70]),
                (15, [5, 50, 45, 50, 45, 85, 5, 85]), (3, [85, 40, 125, 40, 125, 85, 85, 85]),
                (88, [90, 5, 125, 5, 125, 30, 90, 30])],
}
W, H = 128, 90


def main() -> None:
    (OUT / "val2014").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for image_id, objs in IMAGES.items():
        name = f"COCO_val2014_{image_id:012d}.jpg"
        bg = (rng.random((H, W, 3)) * 60 + 90).astype(np.uint8)
        im = Image.fromarray(bg)
        d = ImageDraw.Draw(im)
        for k, (cat, poly) in enumerate(objs):
            if poly is None:  # a box-only instance (COCO's crowd-free boxes without a polygon)
                x, y, w, h = 90, 60, 30, 25
                d.rectangle([x, y, x + w - 1, y + h - 1], fill=COLOURS[cat])
                seg, bbox, area = [], [x, y, w, h], float(w * h)
            else:
                d.polygon(list(zip(poly[::2], poly[1::2])), fill=COLOURS[cat])
                xs, ys = poly[::2], poly[1::2]
                seg, bbox = [[float(v) for v in poly]], [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
                area = float(bbox[2] * bbox[3])
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "segmentation": seg,
                         "bbox": [float(v) for v in bbox], "area": area, "iscrowd": 0})
        im.save(OUT / "val2014" / name, quality=90)
        images.append({"id": image_id, "file_name": name, "width": W, "height": H})
    cats = [{"id": i, "name": n, "supercategory": "thing"} for i, n in CATEGORIES.items()]
    (OUT / "instances_fake2014.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (OUT / "image_ids.txt").write_text("\n".join(str(i) for i in IMAGES) + "\n")
    print(f"fake COCO written to {OUT}")


if __name__ == "__main__":
    main()
