# Whole-slide segmentation: the slides, their inputs and outputs (included by wsi.smk).
# Slides: the synthetic demo slide(s), or the user's slide sheet (wsi.slides).
import re

from omniseg.wsi.sheet import load_slide_sheet
from omniseg.wsi.steps import scale_keys

WSI = config["wsi"]
#: Scale keys of the tissue table ("0.25", "1", "2"): one prediction job per slide and scale.
WSI_SCALES = scale_keys(TISSUES)
#: What every slide gets in results/wsi/{slide}/.
WSI_EXPORTS = ["labels.ome.tif", "overlay.png", "tissues.geojson", "areas.csv"]


def wsi_slides():
    """Slide id -> path, mpp, mask image, truth: the synthetic demo slides or the slide sheet
    (validated while the DAG is built; file existence only)."""
    if WSI["slides"] == "synthetic":
        return {
            f"synth_{i}": {
                "path": f"results/slides/synth_{i}.tif",
                "mpp": None,
                "mask": "",
                "truth": f"results/slides/synth_{i}_truth.h5",
            }
            for i in range(WSI["synthetic"]["count"])
        }
    sheet = load_slide_sheet(WSI["slides"], check_files=True)
    return {
        row["slide_id"]: {k: row[k] for k in ("path", "mpp", "mask", "truth")}
        for row in sheet.to_dict(orient="records")
    }


SLIDES = wsi_slides()


def wsi_models():
    """The model of wsi.method, which must be a configured single-network method."""
    method = WSI["method"]
    if method not in METHODS:
        raise ValueError(
            f"wsi.method {method!r} is not a configured method ({', '.join(METHODS)})"
        )
    if METHODS[method].get("per_tissue", False):
        raise ValueError(
            f"wsi.method {method!r} trains one network per tissue; whole-slide segmentation "
            "runs one network for every tissue: choose a single-network method"
        )
    return models_of(method)


def wsi_rules():
    """The aggregation rules of the config: nested pairs and the conflict policy."""
    agg = WSI["aggregation"]
    return {"nested": agg["nested"], "conflict": agg["conflict"]}


def get_wsi_slide(wildcards):
    return SLIDES[wildcards.slide]["path"]


def get_wsi_mpp(wildcards):
    return SLIDES[wildcards.slide]["mpp"]


def get_wsi_mask_image(wildcards):
    mask = SLIDES[wildcards.slide]["mask"]
    return [mask] if mask else []


def get_wsi_truth(wildcards):
    return SLIDES[wildcards.slide]["truth"]


def get_synthetic_slide(wildcards):
    """Generator arguments of one synthetic slide: wsi.synthetic, the seed offset by its index."""
    args = {k: v for k, v in WSI["synthetic"].items() if k != "count"}
    index = int(wildcards.slide.rsplit("_", 1)[1])
    return {**args, "seed": args["seed"] + index}


def wsi_outputs():
    """Exports of every slide, and the aggregation score of slides with ground truth."""
    files = []
    for slide, entry in SLIDES.items():
        files += expand("results/wsi/{slide}/{name}", slide=slide, name=WSI_EXPORTS)
        if entry["truth"]:
            files.append(f"results/wsi/{slide}/aggregation_scores.csv")
    return files
